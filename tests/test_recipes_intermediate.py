"""TinyBERT and MiniLM recipes on tiny real models: SDPA = eager, projections train and never reach the export,
resume restores them, decoders work, bad pairings are refused in words."""

import json

import pytest
import torch
import transformers
from safetensors.torch import load_file

from alambic.cli import main
from alambic.config import DataConfig, TrainingConfig
from alambic.data.pipeline import training_batches
from alambic.engine.checkpoint import latest_checkpoint
from alambic.engine.loop import train
from alambic.errors import AlambicError
from alambic.recipes.minilm import MiniLMLossConfig, MiniLMRecipe
from alambic.recipes.tinybert import TinyBERTLossConfig, TinyBERTRecipe
from alambic.students import init_student
from tiny import bpe_tokenizer, tiny_bert, tiny_llama, wordpiece_tokenizer


def first_batch(text_dir, tokenizer, kind):
    batches = training_batches([str(text_dir)], tokenizer, kind, DataConfig(max_length=24), None, 3, seed=0)
    return batches(0)


def loss_of(recipe, batch):
    counts = {k: torch.tensor(float(v)) for k, v in recipe.row_counts(batch).items()}
    loss, terms = recipe.objective(batch, recipe.teacher_targets(batch), counts)
    return loss, terms


@pytest.mark.parametrize("family", ["bert", "llama"])
@pytest.mark.parametrize("method", ["tinybert", "minilm"])
def test_eager_and_sdpa_models_give_the_same_loss(family, method, text_dir):
    build, tokenizer, kind = (tiny_bert, wordpiece_tokenizer(), "masked") if family == "bert" else (
        tiny_llama, bpe_tokenizer(), "causal")
    batch = first_batch(text_dir, tokenizer, kind)
    losses = {}
    for implementation in ("eager", "sdpa"):
        teacher = build(attn_implementation=implementation)
        student = init_student(teacher, layers=[1, 3], hidden_size=16, num_heads=4 if method == "tinybert" else 2,
                               width_init="random").model
        recipe = (TinyBERTRecipe(teacher, student, TinyBERTLossConfig(layer_map="0:0,1:2,2:4")) if method == "tinybert"
                  else MiniLMRecipe(teacher, student, MiniLMLossConfig(relation_heads=4)))
        assert teacher.config._attn_implementation == implementation
        losses[implementation] = loss_of(recipe, batch)
    (eager, eager_terms), (sdpa, sdpa_terms) = losses["eager"], losses["sdpa"]
    assert eager.item() > 0
    torch.testing.assert_close(sdpa, eager, rtol=1e-5, atol=1e-7)
    for name in eager_terms:
        torch.testing.assert_close(sdpa_terms[name], eager_terms[name], rtol=1e-5, atol=1e-7)


def test_narrow_student_learns_through_its_projections(text_dir):
    teacher = tiny_bert()
    student = init_student(teacher, layers=[1, 3], hidden_size=16, intermediate_size=32, num_heads=4,
                           width_init="random").model.train()
    recipe = TinyBERTRecipe(teacher, student, TinyBERTLossConfig(layer_map="uniform"))
    projections = dict(recipe.objective.projections.named_parameters())
    assert set(projections) == {f"per_layer.{m}.{p}" for m in (0, 1, 2) for p in ("weight", "bias")}
    batch = first_batch(text_dir, wordpiece_tokenizer(), "masked")
    optimizer = torch.optim.Adam(recipe.objective.parameters(), lr=3e-3)
    first = None
    for _ in range(20):
        loss, _ = loss_of(recipe, batch)
        first = first if first is not None else loss.item()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert loss.item() < 0.6 * first


def test_shared_projection_and_equal_widths():
    teacher = tiny_bert()
    narrow = init_student(teacher, layers=[1, 3], hidden_size=16, num_heads=4, width_init="random").model
    shared = TinyBERTRecipe(teacher, narrow, TinyBERTLossConfig(share_projection=True))
    assert [n for n, _ in shared.objective.projections.named_parameters()] == ["shared.weight", "shared.bias"]
    same_width = TinyBERTRecipe(teacher, init_student(teacher, layers=[1, 3]).model, TinyBERTLossConfig())
    assert list(same_width.objective.projections.parameters()) == []


def test_differing_head_counts(text_dir):
    teacher = tiny_bert()
    student = init_student(teacher, layers=[1, 3], hidden_size=16, num_heads=2, width_init="random").model
    with pytest.raises(AlambicError, match="2 heads and the teacher 4.*--recipe minilm"):
        TinyBERTRecipe(teacher, student, TinyBERTLossConfig())
    TinyBERTRecipe(teacher, student, TinyBERTLossConfig(alpha_attention=0))  # hidden states only: fine
    loss, terms = loss_of(MiniLMRecipe(teacher, student, MiniLMLossConfig()), first_batch(
        text_dir, wordpiece_tokenizer(), "masked"))
    assert torch.isfinite(loss) and all(v.item() > 0 for v in terms.values())
    with pytest.raises(AlambicError, match="relation heads"):
        MiniLMRecipe(teacher, student, MiniLMLossConfig(relation_heads=3))


def test_export_strips_projections_and_resume_restores_them(text_dir, tmp_path, capsys):
    teacher_dir = tmp_path / "teacher"
    tiny_bert().save_pretrained(teacher_dir)
    wordpiece_tokenizer().save_pretrained(teacher_dir)
    argv = ["distill", "--recipe", "tinybert", "--teacher", str(teacher_dir), "--data", str(text_dir), "--max-steps",
            "4", "--layers", "1,3", "--no-progress", "--set", "student.hidden_size=16", "--set", "student.num_heads=4",
            "--set", "data.max_length=24",
            "--set", "training.save_every=2", "--set", "training.log_every=1"]
    assert main(argv + ["--out", str(tmp_path / "straight")]) == 0
    exported = load_file(str(tmp_path / "straight" / "student" / "model.safetensors"))
    assert not any("projection" in k or "per_layer" in k for k in exported)
    student = transformers.AutoModelForMaskedLM.from_pretrained(tmp_path / "straight" / "student")
    assert student.config.hidden_size == 16 and student.config.num_hidden_layers == 2
    extra = load_file(str(latest_checkpoint(tmp_path / "straight") / "objective-extra.safetensors"))
    assert sorted(extra) == sorted(f"projections.per_layer.{m}.{p}" for m in (0, 1, 2) for p in ("weight", "bias"))

    log = [json.loads(x) for x in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert {"loss/embedding", "loss/hidden", "loss/attention"} <= set(log[-1])


class Interrupt(Exception):
    pass


def test_resume_restores_the_projections(text_dir, tmp_path):
    def run(out, stop_at=None, resume=False):
        teacher = tiny_bert()
        student = init_student(teacher, layers=[1, 3], hidden_size=16, num_heads=4, width_init="random").model.train()
        recipe = TinyBERTRecipe(teacher, student, TinyBERTLossConfig())
        batches = training_batches([str(text_dir)], wordpiece_tokenizer(), "masked", DataConfig(max_length=24), None,
                                   2, seed=0)

        def source(index):
            if stop_at is not None and index >= stop_at:
                raise Interrupt
            return batches(index)

        cfg = TrainingConfig(max_steps=4, batch_size=2, lr=3e-3, save_every=2, log_every=1, seed=0)
        train(recipe, source, cfg, out, tokenizer=wordpiece_tokenizer(), resume=resume, progress=False)
        return recipe.objective.state_dict()

    straight = run(tmp_path / "straight")
    with pytest.raises(Interrupt):
        run(tmp_path / "resumed", stop_at=3)  # dies in step 4, after the step-2 checkpoint
    resumed = run(tmp_path / "resumed", resume=True)
    assert any("projections" in k for k in straight)
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_prediction_term_equals_the_soft_target_kl_on_full_logits(family, text_dir):
    import torch.nn.functional as F

    teacher, tokenizer, kind = ((tiny_bert(), wordpiece_tokenizer(), "masked") if family == "bert"
                                else (tiny_llama(), bpe_tokenizer(), "causal"))
    student = init_student(teacher, layers=[1, 3], hidden_size=16, num_heads=4, width_init="random").model.eval()
    cfg = TinyBERTLossConfig(alpha_embedding=0, alpha_hidden=0, alpha_attention=0, alpha_prediction=3.0, temperature=2.0)
    recipe, batch = TinyBERTRecipe(teacher, student, cfg), first_batch(text_dir, tokenizer, kind)
    loss, terms = loss_of(recipe, batch)
    loss.backward()
    fused = {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}
    student.zero_grad(set_to_none=True)

    mask = batch["attention_mask"].bool()
    with torch.no_grad():
        t_logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[mask]
    s_logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[mask]
    direct = F.kl_div(F.log_softmax(s_logits / 2, -1), F.log_softmax(t_logits / 2, -1), reduction="batchmean",
                      log_target=True) * 4
    torch.testing.assert_close(terms["prediction"], direct.detach(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(loss.detach(), 3 * direct.detach(), rtol=1e-4, atol=1e-6)
    (3 * direct).backward()
    assert fused.keys() == {n for n, p in student.named_parameters() if p.grad is not None}
    for name, p in student.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(fused[name], p.grad, rtol=1e-4, atol=1e-5)


def test_decoder_teacher_and_student(text_dir, tmp_path):
    teacher = tiny_llama()
    student = init_student(teacher, layers=[1, 3], hidden_size=16, num_heads=4, width_init="random").model.train()
    batches = training_batches([str(text_dir)], bpe_tokenizer(), "causal", DataConfig(max_length=24), None, 2, seed=0)
    recipe = TinyBERTRecipe(teacher, student, TinyBERTLossConfig(alpha_prediction=1.0, temperature=2.0))
    result = train(recipe, batches, TrainingConfig(max_steps=3, log_every=1, save_every=3), tmp_path, progress=False)
    assert all(result.metrics[f"loss/{t}"] > 0 for t in ("embedding", "hidden", "attention", "prediction"))


def test_invalid_layer_map_from_the_command_line(text_dir, tmp_path, capsys):
    teacher_dir = tmp_path / "teacher"
    tiny_bert().save_pretrained(teacher_dir)
    wordpiece_tokenizer().save_pretrained(teacher_dir)
    capsys.readouterr()  # transformers' saving progress bar, before the CLI turns such bars off
    code = main(["distill", "--recipe", "tinybert", "--teacher", str(teacher_dir), "--data", str(text_dir),
                 "--out", str(tmp_path / "run"), "--layer-map", "0:0,1:3,2:2", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "not monotonic" in err and len(err.strip().splitlines()) == 1


def test_copied_layer_map_follows_the_layers_init_student_recorded(text_dir, tmp_path, capsys):
    teacher_dir, student_dir = tmp_path / "teacher", tmp_path / "student"
    tiny_bert().save_pretrained(teacher_dir)
    wordpiece_tokenizer().save_pretrained(teacher_dir)
    assert main(["init-student", "--teacher", str(teacher_dir), "--layers", "1,2,3", "--out", str(student_dir)]) == 0
    assert json.loads((student_dir / "alambic-layers.json").read_text()) == {"teacher_layers": 4, "layers": [1, 2, 3]}
    common = ["distill", "--recipe", "tinybert", "--teacher", str(teacher_dir), "--student", str(student_dir),
              "--data", str(text_dir), "--max-steps", "1", "--no-progress"]
    capsys.readouterr()
    assert main(common + ["--out", str(tmp_path / "uniform"), "--layer-map", "uniform"]) == 0
    assert "uniform pairs student:teacher layers 0:0,1:1,2:3,3:4, but the student's layers were copied from " \
           "0:0,1:2,2:3,3:4" in capsys.readouterr().out
    assert main(common + ["--out", str(tmp_path / "copied"), "--layer-map", "copied"]) == 0
    assert "layer map copied: 0:0,1:2,2:3,3:4" in capsys.readouterr().out
    assert main(common + ["--out", str(tmp_path / "auto")]) == 0  # the default
    assert "layer map auto: 0:0,1:2,2:3,3:4" in capsys.readouterr().out
    assert "layer_map: auto" in (tmp_path / "auto" / "config.yaml").read_text()  # the choice, not its pairs
    # the distilled student keeps the record, so a later task stage can pair its layers the same way
    assert (tmp_path / "copied" / "student" / "alambic-layers.json").read_text() == \
        (student_dir / "alambic-layers.json").read_text()


def test_auto_layer_map_on_a_pruned_decoder_student_exports_a_plain_model(text_dir, tmp_path, capsys):
    """Composition: width pruning by importance (layers still the teacher's, sliced) -> TinyBERT with projections and
    the default map -> the exported student loads as a plain LlamaForCausalLM of the pruned shape."""
    teacher_dir, student_dir = tmp_path / "teacher", tmp_path / "student"
    tiny_llama().save_pretrained(teacher_dir)
    bpe_tokenizer().save_pretrained(teacher_dir)
    assert main(["init-student", "--teacher", str(teacher_dir), "--layers", "0,3", "--hidden-size", "16",
                 "--num-heads", "2", "--calibration-data", str(text_dir), "--calibration-tokens", "256",
                 "--out", str(student_dir)]) == 0
    capsys.readouterr()
    assert main(["distill", "--recipe", "tinybert", "--teacher", str(teacher_dir), "--student", str(student_dir),
                 "--data", str(text_dir), "--max-steps", "2", "--no-progress", "--out", str(tmp_path / "run"),
                 "--set", "loss.alpha_attention=0"]) == 0  # attention compares heads one to one: 2 vs 4
    assert "layer map auto: 0:0,1:1,2:4" in capsys.readouterr().out
    exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "student")
    assert type(exported).__name__ == "LlamaForCausalLM" and exported.config.hidden_size == 16
    assert not [k for k in load_file(str(tmp_path / "run" / "student" / "model.safetensors")) if "projection" in k]


@pytest.mark.real_model
def test_minilm_teacher_into_a_tinybert_4_shaped_student(text_dir, tmp_path):
    """MiniLM-L6 (no MLM head) -> 4 x 312, FFN 1200, 12 heads, freshly initialised; a 6 -> 4 map is not uniform."""
    code = main(["distill", "--recipe", "tinybert", "--teacher", "minilm-l6", "--data", str(text_dir), "--out",
                 str(tmp_path / "run"), "--layers", "linspace:4", "--layer-map", "0:0,1:2,2:3,3:5,4:6",
                 "--max-steps", "2", "--no-progress", "--set", "student.hidden_size=312",
                 "--set", "student.intermediate_size=1200", "--set", "student.num_heads=12", "--set",
                 "data.max_length=32"])
    assert code == 0
    student = transformers.AutoModelForMaskedLM.from_pretrained(tmp_path / "run" / "student")
    assert (student.config.num_hidden_layers, student.config.hidden_size, student.config.intermediate_size) == (4, 312, 1200)
