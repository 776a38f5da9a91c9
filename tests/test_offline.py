"""Offline teacher outputs: `alambic cache-teacher` stores what the teacher computes (checked against a direct forward),
resumes and splits across processes, and `alambic distill --teacher-logits` trains as a live teacher would (k = V:
the same loss), refusing a cache that does not fit the run in one line."""

import json

import pytest
import yaml
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from alambic.cli import main
from alambic.config import DataConfig
from alambic.data.pipeline import training_examples
from alambic.errors import AlambicError
from alambic.losses import topk_targets
from alambic.offline.store import TeacherOutputs, examples_hash, read_manifest
from alambic.offline.training import OfflineDistilBERTRecipe, cached_batches
from alambic.recipes.distilbert import DistilBERTLossConfig, DistilBERTRecipe
from alambic.workflows.cache_teacher import cache_teacher
from tiny import bpe_tokenizer, sample_texts, tiny_bert, tiny_llama, wordpiece_tokenizer

QUIET = {"log": lambda line: None}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("offline")
    tiny_llama().save_pretrained(root / "llama")
    bpe_tokenizer().save_pretrained(root / "llama")
    tiny_bert().save_pretrained(root / "bert")
    wordpiece_tokenizer().save_pretrained(root / "bert")
    (root / "text.txt").write_text("\n\n".join(sample_texts(8)))
    return root


@pytest.fixture(scope="module")
def llama_cache(root):
    cache_teacher(root / "llama", [str(root / "text.txt")], root / "cache-llama", top_k=8, temperature=2.0,
                  max_length=32, hidden_states=True, shard_examples=16, **QUIET)
    return root / "cache-llama"


def test_the_cache_holds_the_teachers_top_k_for_every_token(root, llama_cache):
    manifest = read_manifest(llama_cache)
    tokenizer = bpe_tokenizer()
    examples = training_examples([str(root / "text.txt")], tokenizer, "causal", DataConfig(train=["x"], max_length=32))
    assert manifest["examples"] == len(examples) and manifest["data_hash"] == examples_hash(examples)
    assert manifest["tokens"] == sum(len(examples[i]) for i in range(len(examples)))
    assert len(manifest["shards"]) == -(-len(examples) // 16) and manifest["top_k"] == 8
    assert manifest["kind"] == "causal" and manifest["masking"] is None and manifest["hidden_states"]
    shard = load_file(str(llama_cache / manifest["shards"][1]["file"]))
    assert manifest["format_version"] == 2 and shard["packed"].dtype == torch.uint8
    # example 16 (the first of shard 1), recomputed directly, against what a run reads back
    ids = torch.as_tensor(examples[16]).unsqueeze(0)
    with torch.no_grad():
        out = tiny_llama()(input_ids=ids, output_hidden_states=True)
    top_ids, top_log_probs, rest = topk_targets(out.logits[0], 8, 2.0)
    rows = slice(0, len(examples[16]))
    outputs = TeacherOutputs(llama_cache, manifest)
    read = outputs.rows([outputs[16]])
    assert torch.equal(shard["input_ids"][rows].long(), ids[0])
    order = top_ids.argsort(-1)  # format 2 gives each row's ids in ascending order
    assert torch.equal(read["topk_ids"], top_ids.gather(-1, order))
    expected = top_log_probs.gather(-1, order)
    gaps = top_log_probs.max(-1, keepdim=True).values - expected
    inner = gaps < 9.6  # beyond, the last code: a probability below 6e-5 of the maximum
    # renormalised on reading: log-probabilities move by their code's bucket and a shared shift below 0.05
    assert ((read["topk_log_probs"] - expected).abs()[inner] <= torch.exp(0.5 * gaps[inner]) / 20 + 0.05).all()
    torch.testing.assert_close(read["rest_log_prob"], rest, atol=2e-3, rtol=1e-3)
    torch.testing.assert_close(shard["hidden"][rows].float(), out.hidden_states[-1][0], atol=2e-3, rtol=1e-3)
    # the mean probability outside the top 8, from the teacher itself: 1 - (sum of its 8 largest probabilities)
    outside = []
    with torch.no_grad():
        for i in range(len(examples)):
            logits = tiny_llama()(input_ids=torch.as_tensor(examples[i]).unsqueeze(0)).logits[0]
            outside.append(1 - (logits.float() / 2.0).softmax(-1).topk(8, dim=-1).values.sum(-1))
    assert manifest["mean_rest_mass"] == pytest.approx(float(torch.cat(outside).mean()), rel=1e-4)
    # fewer bytes per token than format 1's ids 4 + k (2 + 2) + rest 4 + hidden 2d: 4 + 2 + 2 + 2d + the blocks
    assert 4 + 2 + 2 + 2 * 32 < manifest["bytes_per_token"] < 4 + 8 * 4 + 4 + 2 * 32


def _loss(recipe, batch):
    counts = {k: torch.tensor(v) for k, v in recipe.row_counts(batch).items()}
    loss, terms = recipe.objective(batch, recipe.teacher_targets(batch), counts)
    loss.backward()
    return loss.detach(), {k: v.detach() for k, v in terms.items()}


@pytest.mark.parametrize("kind, version", [("causal", 1), ("masked", 1), ("causal", 2)])
def test_with_k_equal_to_the_vocabulary_the_cached_loss_is_the_live_loss(kind, version, root, tmp_path):
    """Format 1 (float16) is the live loss to float16; format 2 (6-bit log-probabilities) to within what its
    quantisation moves a KL, a few 1e-3 nats (its encoders are covered at k = 8 elsewhere: at k = V, LZMA over a
    wordpiece vocabulary per token takes minutes)."""
    model, name = (tiny_llama, "llama") if kind == "causal" else (tiny_bert, "bert")
    tokenizer = bpe_tokenizer() if kind == "causal" else wordpiece_tokenizer()
    vocab = model().config.vocab_size
    cache_teacher(root / name, [str(root / "text.txt")], tmp_path / "cache", top_k=vocab, temperature=2.0,
                  max_length=32, hidden_states=True, format_version=version, **QUIET)
    outputs = TeacherOutputs(tmp_path / "cache", read_manifest(tmp_path / "cache"))
    loss_cfg = DistilBERTLossConfig()
    cached = cached_batches(outputs, tokenizer, batch_size=4, seed=0)(3)
    live_batch = {k: v for k, v in cached.items() if not k.startswith("teacher_")}  # the same inputs and masks
    live = DistilBERTRecipe(model(), model(seed=1), loss_cfg)
    offline = OfflineDistilBERTRecipe(model(seed=1), loss_cfg)
    live_loss, live_terms = _loss(live, live_batch)
    offline_loss, offline_terms = _loss(offline, cached)
    for key in ("lm", "cos"):  # fp16 storage of hidden states: a few 1e-4 relative
        torch.testing.assert_close(offline_terms[key], live_terms[key], rtol=2e-3, atol=1e-4)
    if version == 1:  # fp16 log-probs
        torch.testing.assert_close(offline_terms["kd"], live_terms["kd"], rtol=2e-3, atol=1e-4)
        for p_live, p_off in zip(live.objective.parameters(), offline.objective.parameters()):
            torch.testing.assert_close(p_off.grad, p_live.grad, rtol=1e-2, atol=1e-4)
        return
    assert abs(float(offline_terms["kd"]) - float(live_terms["kd"])) < 3e-3
    pairs = [(p_live.grad.flatten(), p_off.grad.flatten())
             for p_live, p_off in zip(live.objective.parameters(), offline.objective.parameters())
             if p_live.grad is not None]
    live_grad, offline_grad = torch.cat([a for a, _ in pairs]), torch.cat([b for _, b in pairs])
    assert F.cosine_similarity(offline_grad, live_grad, dim=0) > 0.99  # the whole step points the same way


def test_encoder_masks_are_static_and_stored(root, tmp_path):
    cache_teacher(root / "bert", [str(root / "text.txt")], tmp_path / "cache", top_k=4, max_length=32, **QUIET)
    manifest = read_manifest(tmp_path / "cache")
    assert manifest["masking"] == {"kind": "static", "mlm_probability": 0.15, "seed": 0}
    outputs = TeacherOutputs(tmp_path / "cache", manifest)
    batches = cached_batches(outputs, wordpiece_tokenizer(), batch_size=4, seed=0)
    per_epoch = batches.per_epoch
    first, again = batches(0), batches(per_epoch * 3)  # another epoch: other order, the same masks per example

    def masked_tokens(batch):
        rows = batch["input_ids"].reshape(-1)
        return sorted(zip(rows[batch["lm_positions"]].tolist(), batch["lm_targets"].tolist()))

    mask_id = wordpiece_tokenizer().mask_token_id
    assert len(first["lm_positions"]) > 0 and mask_id in first["input_ids"].reshape(-1)[first["lm_positions"]]
    all_first = sorted(sum((masked_tokens(batches(i)) for i in range(per_epoch)), []))
    all_again = sorted(sum((masked_tokens(batches(per_epoch * 3 + i)) for i in range(per_epoch)), []))
    assert all_first == all_again
    assert len(first["teacher_rest_log_prob"]) == int(first["attention_mask"].sum())
    assert torch.equal(again["lm_targets"], batches(per_epoch * 3)["lm_targets"])  # a batch is its index's alone


def test_an_interrupted_cache_resumes_and_two_processes_write_the_same_files(root, tmp_path, monkeypatch):
    args = dict(top_k=8, max_length=32, shard_examples=16, **QUIET)
    cache_teacher(root / "llama", [str(root / "text.txt")], tmp_path / "one", **args)
    for rank in (0, 1):  # two processes, one after the other: the second to finish writes the manifest
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        result = cache_teacher(root / "llama", [str(root / "text.txt")], tmp_path / "two", **args)
        assert (result is None) == (rank == 0)
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    one, two = read_manifest(tmp_path / "one"), read_manifest(tmp_path / "two")
    for a, b in zip(one["shards"], two["shards"]):
        assert (tmp_path / "one" / a["file"]).read_bytes() == (tmp_path / "two" / b["file"]).read_bytes()
    # interrupted: the manifest and a shard missing; a rerun writes only that shard
    (tmp_path / "one" / "manifest.json").unlink()
    (tmp_path / "one" / one["shards"][1]["file"]).unlink()
    before = (tmp_path / "one" / one["shards"][0]["file"]).stat().st_mtime_ns
    lines = []
    cache_teacher(root / "llama", [str(root / "text.txt")], tmp_path / "one", top_k=8, max_length=32,
                  shard_examples=16, log=lines.append)
    assert read_manifest(tmp_path / "one") == one
    assert (tmp_path / "one" / one["shards"][0]["file"]).stat().st_mtime_ns == before
    assert any("1 to write" in line for line in lines)


def test_distill_with_teacher_logits_trains_through_the_cli(root, llama_cache, tmp_path):
    argv = ["distill", "--teacher-logits", llama_cache, "--teacher", root / "llama", "--layers", "0,3", "--max-steps",
            "3", "--batch-size", "2", "--set", "data.max_length=32", "--no-progress", "--out", tmp_path / "run"]
    assert main([str(a) for a in argv]) == 0
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any(m.get("loss/kd", 0) > 0 and m.get("loss/cos", 0) > 0 for m in metrics)
    card = (tmp_path / "run" / "student" / "README.md").read_text()
    manifest = read_manifest(llama_cache)
    assert f"- teacher: `{root / 'llama'}` (4 layers, {manifest['teacher_parameters'] / 1e6:.3g}M parameters)" in card \
        or f"- teacher: `{root / 'llama'}` (4 layers, " in card
    assert (f"- teacher outputs: read from the cache `{llama_cache}` (`alambic cache-teacher`); the teacher did not "
            "run while training") in card
    import transformers

    assert transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "student").config.num_hidden_layers == 2


def test_an_interrupted_offline_run_resumes_to_the_same_weights(root, llama_cache, tmp_path):
    from alambic.config import TrainingConfig
    from alambic.engine.checkpoint import latest_checkpoint
    from alambic.engine.loop import train
    from alambic.teachers import load_model

    cfg = TrainingConfig(max_steps=4, batch_size=2, save_every=2, mixed_precision="no", log_every=1)
    cfg.validate()

    def make_run():
        outputs = TeacherOutputs(llama_cache, read_manifest(llama_cache))
        student = load_model(root / "llama", for_training=True)[0]
        return OfflineDistilBERTRecipe(student, DistilBERTLossConfig()), cached_batches(outputs, bpe_tokenizer(), 2, 0)

    class Interrupt(Exception):
        pass

    recipe, batches = make_run()
    train(recipe, batches, cfg, tmp_path / "straight", tokenizer=bpe_tokenizer(), progress=False)
    straight = recipe.student.state_dict()

    recipe, batches = make_run()

    def interrupted(index):
        if index >= 3:  # dies during step 4, after the checkpoint of step 2
            raise Interrupt
        return batches(index)

    with pytest.raises(Interrupt):
        train(recipe, interrupted, cfg, tmp_path / "resumed", tokenizer=bpe_tokenizer(), progress=False)
    assert latest_checkpoint(tmp_path / "resumed").name == "step-0000002"
    recipe, batches = make_run()
    train(recipe, batches, cfg, tmp_path / "resumed", tokenizer=bpe_tokenizer(), resume=True, progress=False)
    resumed = recipe.student.state_dict()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    start = load_file(str(root / "llama" / "model.safetensors"))
    assert any(not torch.equal(straight[k], start[k]) for k in start)  # it trained


def bad_runs(root, cache):
    other = root / "other-vocab"
    if not other.exists():
        tiny_llama(vocab_size=30522).save_pretrained(other)
        wordpiece_tokenizer().save_pretrained(other)
    (root / "unfinished").mkdir(exist_ok=True)
    (root / "unfinished" / "settings.json").write_text("{}")
    run = ["distill", "--teacher-logits", cache, "--student", root / "llama", "--set", "data.max_length=32"]
    return {
        "temperature differs": (run + ["--set", "loss.temperature=4"], "stores the teacher at temperature 2, the run's"),
        "max_length differs": (run[:-1] + ["data.max_length=64"], "was made with max_length 32, the run uses 64"),
        "other data": (run + ["--data", root / "other.txt"], "was made on other data"),
        "other tokenizer": (run[:3] + ["--student", other] + run[5:], "another tokenizer than the student's"),
        "recipe needs the teacher live": (run + ["--recipe", "tinybert"], "needs the teacher live"),
        "no student and no teacher": (run[:3] + run[5:], "needs the student to train: give --student DIR"),
        "unfinished cache": (["distill", "--teacher-logits", root / "unfinished", "--student", root / "llama"],
                             "is not a finished teacher cache"),
        "cache-teacher: top-k 0": (["cache-teacher", "--teacher", root / "llama", "--data", root / "text.txt",
                                    "--out", root / "c0", "--top-k", "0"], "--top-k must be >= 1"),
        "cache-teacher: other settings": (["cache-teacher", "--teacher", root / "llama", "--data", root / "text.txt",
                                           "--out", cache, "--top-k", "4", "--max-length", "32", "--hidden-states",
                                           "--temperature", "2",
                                           "--shard-examples", "16"], "made with other settings (top_k differ)"),
        "cache-teacher: encoder without LM head": (["cache-teacher", "--teacher", "minilm-l6", "--data",
                                                    root / "text.txt", "--out", root / "c1"],
                                                   "has no language-model head"),
    }


BAD_RUNS = ["temperature differs", "max_length differs", "other data", "other tokenizer",
            "recipe needs the teacher live", "no student and no teacher", "unfinished cache",
            "cache-teacher: top-k 0", "cache-teacher: other settings", "cache-teacher: encoder without LM head"]


@pytest.mark.parametrize("case", BAD_RUNS)
def test_a_cache_that_does_not_fit_is_refused_in_one_line(case, root, llama_cache, tmp_path, capsys):
    (root / "other.txt").write_text("\n\n".join(sample_texts(12)[8:]))
    runs = bad_runs(root, llama_cache)
    assert sorted(runs) == sorted(BAD_RUNS)
    argv, message = runs[case]
    if argv[0] == "distill":
        argv = argv + ["--out", tmp_path / "run", "--max-steps", "1", "--no-progress"]
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("alambic: error: ") and message in lines[0], err
    assert not (tmp_path / "run" / "student").exists()


def test_a_student_of_another_width_is_refused_when_the_cosine_term_is_asked_for(root, llama_cache, tmp_path, capsys):
    # the cache holds hidden states of width 32; a narrower student with the cosine term set on cannot use them
    tiny_llama(hidden_size=16, intermediate_size=32).save_pretrained(tmp_path / "narrow")
    bpe_tokenizer().save_pretrained(tmp_path / "narrow")
    argv = ["distill", "--teacher-logits", llama_cache, "--student", tmp_path / "narrow", "--set",
            "data.max_length=32", "--set", "loss.alpha_cos=1", "--max-steps", "1", "--no-progress", "--out",
            tmp_path / "run"]
    assert main([str(a) for a in argv]) == 2
    assert "stores hidden states of width 32, the student's are 16" in capsys.readouterr().err
    assert not (tmp_path / "run" / "student").exists()
    # left unset, the cosine term is turned off for it, and said
    assert main([str(a) for a in argv[:7] + argv[9:]]) == 0
    out = capsys.readouterr().out
    assert "loss.alpha_cos=0: the cosine term needs equal widths, and the student is 16 wide, the teacher 32" in out
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["loss"]["alpha_cos"] == 0


def test_the_readme_example_adopts_the_caches_temperature_length_and_hidden_state_choice(root, tmp_path, capsys):
    # cache-teacher's defaults (T = 1, no hidden states) and distill's (T = 2, alpha_cos = 1, max_length 128) differ:
    # unset options take the cache's values, as the README's two commands expect
    cache = tmp_path / "cache"
    assert main([str(a) for a in ["cache-teacher", "--teacher", root / "llama", "--data", root / "text.txt",
                                  "--out", cache, "--top-k", "8", "--max-length", "32"]]) == 0
    capsys.readouterr()
    run = ["distill", "--teacher-logits", cache, "--student", root / "llama", "--out", tmp_path / "run",
           "--max-steps", "2", "--batch-size", "2", "--no-progress"]
    assert main([str(a) for a in run]) == 0
    assert ("from the teacher cache: loss.temperature=1, data.max_length=32, loss.alpha_cos=0 (the cache holds no "
            "hidden states for the cosine term)") in capsys.readouterr().out
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert (saved["loss"]["temperature"], saved["data"]["max_length"], saved["loss"]["alpha_cos"]) == (1.0, 32, 0.0)
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any(m.get("loss/kd", 0) > 0 for m in metrics)
    # explicit contradictions and options the cache makes moot are refused, each in one line
    for extra, said in [(["--set", "loss.alpha_cos=1"], "has no hidden states, which the cosine term needs"),
                        (["--set", "loss.temperature=2"], "stores the teacher at temperature 1, the run's"),
                        (["--set", "loss.mlm_probability=0.2"], "loss.mlm_probability does not apply with "
                         "--teacher-logits: the cache holds a decoder's outputs; drop loss.mlm_probability")]:
        assert main([str(a) for a in run[:6] + [tmp_path / "refused"] + run[7:] + extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and said in err[0], err
        assert not (tmp_path / "refused").exists()


def test_shards_are_read_row_by_row_as_safetensors_stores_them(llama_cache, tmp_path):
    from safetensors.torch import load_file

    from alambic.offline.store import ShardReader

    manifest = read_manifest(llama_cache)
    path = llama_cache / manifest["shards"][0]["file"]
    stored = load_file(str(path))
    reader = ShardReader(path)
    for name, tensor in stored.items():
        assert torch.equal(reader.whole(name), tensor), name
        rows = len(tensor)
        assert torch.equal(reader.rows(name, rows // 3, rows // 2), tensor[rows // 3: rows // 2]), name
    # nothing of a shard is kept but its offsets: the run's memory does not grow with the cache
    outputs = TeacherOutputs(llama_cache, manifest)
    batch = outputs.rows([outputs.example(i) for i in range(len(outputs))])
    assert len(batch["topk_ids"]) == sum(s["rows"] for s in manifest["shards"])
    assert not any(isinstance(v, torch.Tensor) for v in vars(outputs).values())
    # a shard cut short (a copy interrupted) is named in one line
    (tmp_path / "cut.safetensors").write_bytes(path.read_bytes()[:-100])
    cut = ShardReader(tmp_path / "cut.safetensors")
    with pytest.raises(AlambicError, match="cut.safetensors is shorter than its header says"):
        for name in cut.tensors:  # the last tensor in the file lost its end
            cut.whole(name)
