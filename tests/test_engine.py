"""The training engine on tiny real models: exact resume, accumulation normalisation, NaN handling, checkpoints."""

import json

import pytest
import torch
from safetensors.torch import load_file

from alambic.config import DataConfig, TrainingConfig
from alambic.data.collate import CausalLMCollator
from alambic.data.pipeline import training_batches
from alambic.engine.checkpoint import latest_checkpoint
from alambic.engine.loop import NonFiniteLoss, train
from alambic.recipes.distilbert import DistilBERTLossConfig, DistilBERTRecipe
from alambic.students import init_student
from tiny import bpe_tokenizer, tiny_bert, tiny_llama, wordpiece_tokenizer


def make_run(family, text_dir, **training):
    teacher, tokenizer = (tiny_llama(), bpe_tokenizer()) if family == "causal" else (tiny_bert(), wordpiece_tokenizer())
    student = init_student(teacher, layers="every-other").model.train()
    cfg = TrainingConfig(**{"max_steps": 6, "batch_size": 2, "lr": 1e-3, "log_every": 1, "save_every": 3,
                            "seed": 0, **training})
    loss = DistilBERTLossConfig()
    batches = training_batches([text_dir], tokenizer, family, DataConfig(train=[text_dir], max_length=32), loss,
                               cfg.batch_size, cfg.seed)
    return DistilBERTRecipe(teacher, student, loss), batches, cfg, tokenizer


class Interrupt(Exception):
    pass


@pytest.mark.parametrize("family, precision", [("causal", "no"), ("masked", "no"), ("causal", "bf16")])
def test_interrupted_run_resumed_ends_with_the_same_weights(family, precision, text_dir, tmp_path):
    """In bf16 too: the checkpoint holds the fp32 master weights, which the resumed run rounds to the same bf16."""
    _reset_accelerate()
    recipe, batches, cfg, tok = make_run(family, text_dir, mixed_precision=precision)
    train(recipe, batches, cfg, tmp_path / "straight", tokenizer=tok, progress=False)
    straight = {k: v.clone() for k, v in recipe.student.state_dict().items()}
    assert {v.dtype for v in straight.values() if v.is_floating_point()} == {torch.float32}

    recipe, batches, cfg, tok = make_run(family, text_dir, mixed_precision=precision)
    per_step = cfg.grad_accum  # micro-batches per optimiser step

    def interrupted(index):
        if index >= 4 * per_step:  # dies during step 5, after the checkpoint of step 3
            raise Interrupt
        return batches(index)

    with pytest.raises(Interrupt):
        train(recipe, interrupted, cfg, tmp_path / "resumed", tokenizer=tok, progress=False)
    assert latest_checkpoint(tmp_path / "resumed").name == "step-0000003"

    recipe, batches, cfg, tok = make_run(family, text_dir, mixed_precision=precision)  # a fresh process, same config
    train(recipe, batches, cfg, tmp_path / "resumed", tokenizer=tok, resume=True, progress=False)
    _reset_accelerate()
    resumed = recipe.student.state_dict()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight), "resumed weights differ"
    logs = {name: [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
            for name in ("straight", "resumed")}
    assert [r["step"] for r in logs["resumed"]] == [1, 2, 3, 4, 5, 6]
    assert [r["tokens"] for r in logs["resumed"]] == [r["tokens"] for r in logs["straight"]]  # the total resumes too
    assert sorted(p.name for p in (tmp_path / "resumed" / "checkpoints").glob("step-*")) == ["step-0000003", "step-0000006"]


def test_accumulated_micro_batches_of_unequal_length_give_the_full_batch_loss(tmp_path):
    """One batch of 4 sequences vs the same 4 split 1 + 3 (very different token counts) with grad_accum=2."""
    tokenizer = bpe_tokenizer()
    collate = CausalLMCollator(tokenizer)
    g = torch.Generator().manual_seed(0)
    examples = [torch.randint(4, 512, (n,), generator=g).numpy() for n in (30, 5, 9, 7)]
    runs = {}
    for name, accum, source in (
        ("full", 1, lambda i: collate(examples, seed=i)),
        ("split", 2, lambda i: collate(examples[:1] if i % 2 == 0 else examples[1:], seed=i)),
    ):
        teacher = tiny_llama()
        student = init_student(teacher, layers=[0, 2]).model.train()
        recipe = DistilBERTRecipe(teacher, student, DistilBERTLossConfig())
        cfg = TrainingConfig(max_steps=2, batch_size=4, grad_accum=accum, log_every=1, save_every=10, seed=0,
                             warmup_ratio=0.0)
        train(recipe, source, cfg, tmp_path / name, progress=False)
        runs[name] = (
            [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()],
            student.state_dict(),
        )
    (full_log, full_w), (split_log, split_w) = runs["full"], runs["split"]
    # throughput and the running total count real tokens: 30 + 5 + 9 + 7 per step, whatever the padding
    assert [r["tokens"] for r in full_log] == [r["tokens"] for r in split_log] == [51, 102]
    for a, b in zip(full_log, split_log):
        for key in ("loss", "loss/kd", "loss/lm", "loss/cos", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=2e-4), key
    for k in full_w:
        torch.testing.assert_close(full_w[k], split_w[k], rtol=1e-4, atol=1e-6)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(text_dir, tmp_path):
    recipe, batches, cfg, tok = make_run("causal", text_dir, lr=1e30, save_every=1, grad_clip=0.0, warmup_ratio=0.0)
    with pytest.raises(NonFiniteLoss, match="NaN or infinite .* last good checkpoint is") as error:
        train(recipe, batches, cfg, tmp_path / "run", tokenizer=tok, progress=False)
    good = latest_checkpoint(tmp_path / "run")
    assert str(good) in str(error.value)
    assert f"before step {int(good.name[5:]) + 1}" in str(error.value)
    from transformers import AutoModelForCausalLM

    weights = AutoModelForCausalLM.from_pretrained(good / "student").state_dict()
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_resume_without_checkpoint_is_a_clear_error(text_dir, tmp_path):
    from alambic.errors import AlambicError

    recipe, batches, cfg, tok = make_run("causal", text_dir)
    with pytest.raises(AlambicError, match="no checkpoint"):
        train(recipe, batches, cfg, tmp_path / "empty", resume=True, progress=False)


def test_best_student_kept_and_early_stopping(text_dir, tmp_path):
    """A scripted metric: 1 at step 0, 3 at step 2 (best), then no improvement: patience 2 stops at step 6."""
    recipe, batches, cfg, tok = make_run("causal", text_dir, max_steps=20, eval_every=2, best_metric="score",
                                         early_stopping_patience=2, save_every=100)
    scores = iter([1.0, 3.0, 2.0, 2.5, 9.0])
    snapshots = {}

    def evaluate(student):
        snapshots[len(snapshots)] = {k: v.clone() for k, v in student.state_dict().items()}
        return {"score": next(scores)}

    result = train(recipe, batches, cfg, tmp_path / "run", tokenizer=tok, evaluate=evaluate, progress=False)
    assert result.step == 6
    from transformers import AutoModelForCausalLM

    best = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "best").state_dict()
    assert all(torch.equal(best[k], snapshots[1][k]) for k in best)
    log = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [(r["step"], r["eval/score"], r["eval/best_score"]) for r in log if "eval/score" in r]
    assert evals == [(0, 1.0, 1.0), (2, 3.0, 3.0), (4, 2.0, 3.0), (6, 2.5, 3.0)]
    assert latest_checkpoint(tmp_path / "run").name == "step-0000006"


def _reset_accelerate():
    """accelerate keeps one process-wide state, whose mixed precision cannot change once set: start a new one."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.mark.parametrize("family", ["causal", "masked"])
def test_bf16_mixed_precision_puts_the_teacher_in_bf16_and_matches_fp32_losses(family, text_dir, tmp_path):
    """Both bf16 schemes (a bf16 student with fp32 master weights; fp32 weights under autocast), with a bf16
    teacher: every loss term of the first three steps is within 1% of the fp32 run's, and the student ends in fp32."""
    logged = {}
    for precision in ("no", "bf16", "bf16-autocast"):
        _reset_accelerate()
        try:
            recipe, batches, cfg, tok = make_run(family, text_dir, max_steps=3, mixed_precision=precision)
            train(recipe, batches, cfg, tmp_path / precision, tokenizer=tok, progress=False)
        finally:
            _reset_accelerate()  # the tests that follow get a fresh state, without bf16
        logged[precision] = [json.loads(line) for line in (tmp_path / precision / "metrics.jsonl").read_text().splitlines()]
        assert {p.dtype for p in recipe.student.parameters()} == {torch.float32}
        expected = torch.float32 if precision == "no" else torch.bfloat16
        assert {p.dtype for p in recipe.teacher.parameters()} == {expected}
    for scheme in ("bf16", "bf16-autocast"):
        assert [r["step"] for r in logged[scheme]] == [1, 2, 3]
        for fp32, bf16 in zip(logged["no"], logged[scheme]):
            for term in ("loss", "loss/kd", "loss/lm", "loss/cos"):
                assert bf16[term] == pytest.approx(fp32[term], rel=0.01), (scheme, fp32["step"], term, fp32[term],
                                                                          bf16[term])


@pytest.mark.parametrize("schedule, factors", [
    ("linear", [1.0, 1.0, 0.75, 0.5, 0.25, 0.0]),  # warm-up over 2 steps, then linear to 0 at max_steps
    ("cosine", [1.0, 1.0, 0.8535534, 0.5, 0.1464466, 0.0]),  # 0.5 (1 + cos(pi * progress))
    ("constant", [1.0] * 6),
])
def test_learning_rate_schedules_as_logged_after_each_step(schedule, factors, text_dir, tmp_path):
    recipe, batches, cfg, tok = make_run("causal", text_dir, schedule=schedule, warmup_ratio=0.34, lr=1e-3)
    train(recipe, batches, cfg, tmp_path / "run", tokenizer=tok, progress=False)
    logged = [json.loads(line)["lr"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert logged == pytest.approx([1e-3 * f for f in factors], abs=1e-10)


def scripted_evaluation(values: dict[int, float]):
    """A batch source wrapper and an evaluation returning ``values[step]``: the step is read off the last
    micro-batch fetched, so a resumed run sees the same figure at the same step."""
    seen = {"step": 0}

    def wrap(batches):
        def source(index):
            seen["step"] = index + 1  # one micro-batch per step
            return batches(index)
        return source

    def evaluate(model):
        snapshots[seen["step"]] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        return {"score": values[seen["step"]]}

    snapshots: dict[int, dict] = {}
    evaluate.snapshots = snapshots  # the student's weights at each evaluation, by step
    return wrap, evaluate


@pytest.mark.parametrize("mode, best_step", [("max", 2), ("min", 3)])
def test_best_model_follows_best_metric_mode(mode, best_step, text_dir, tmp_path):
    wrap, evaluate = scripted_evaluation({0: 1.5, 1: 2.0, 2: 3.0, 3: 0.5, 4: 2.9})
    recipe, batches, cfg, tok = make_run("causal", text_dir, max_steps=4, eval_every=1, best_metric="score",
                                         best_metric_mode=mode)
    result = train(recipe, wrap(batches), cfg, tmp_path / "run", tokenizer=tok, evaluate=evaluate, progress=False)
    assert result.metrics["eval/best_score"] == (3.0 if mode == "max" else 0.5)
    assert (tmp_path / "run" / "best" / "config.json").is_file()
    log = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    bests = [r["eval/best_score"] for r in log if "eval/best_score" in r]
    assert bests[best_step] == result.metrics["eval/best_score"]  # reached at that step and kept after it
    saved = load_file(str(tmp_path / "run" / "best" / "model.safetensors"))
    at_best = evaluate.snapshots[best_step]
    assert all(torch.equal(saved[k], at_best[k]) for k in saved)  # RUN/best holds the student of that step
    assert not all(torch.equal(saved[k], evaluate.snapshots[4][k]) for k in saved)  # not the last one


def test_resume_keeps_the_early_stopping_state(text_dir, tmp_path, capsys):
    """Best 3.0 at step 2, no better at 3 and 4: patience 2 stops at step 4, in one run and in a run interrupted
    after the step-3 checkpoint (whose resumed evaluator must remember the best and the stale count)."""
    values = {0: 1.0, 1: 2.0, 2: 3.0, 3: 2.5, 4: 2.9, 5: 9.0, 6: 9.0, 7: 9.0, 8: 9.0}
    options = dict(max_steps=8, eval_every=1, best_metric="score", early_stopping_patience=2, save_every=3)
    stopped = {}
    for name in ("straight", "resumed"):
        wrap, evaluate = scripted_evaluation(values)
        recipe, batches, cfg, tok = make_run("causal", text_dir, **options)
        source = wrap(batches)
        if name == "resumed":
            def dies_in_step_four(index, source=source):
                if index >= 3:
                    raise Interrupt
                return source(index)

            with pytest.raises(Interrupt):
                train(recipe, dies_in_step_four, cfg, tmp_path / name, tokenizer=tok, evaluate=evaluate,
                      progress=False)
            wrap, evaluate = scripted_evaluation(values)
            recipe, batches, cfg, tok = make_run("causal", text_dir, **options)
            source = wrap(batches)
        capsys.readouterr()
        result = train(recipe, source, cfg, tmp_path / name, tokenizer=tok, evaluate=evaluate,
                       resume=name == "resumed", progress=False)
        stopped[name] = result.step
        assert "early stop at step 4: no better score in 2 evaluations (best 3 at step 2)" in capsys.readouterr().out
    assert stopped == {"straight": 4, "resumed": 4}
