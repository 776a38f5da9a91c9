"""Distilling and fine-tuning chat models end to end: completion-only soft targets with any divergence, on-policy
(GKD) batches sampled by the student with exact resume, supervised fine-tuning of a decoder on chat data."""

import json
import re

import pytest
import torch
from safetensors.torch import load_file

from alambic.cli import main
from alambic.config import load_config
from alambic.data.chat import ChatExample
from alambic.data.on_policy import OnPolicyBatches
from alambic.data.pipeline import training_batches
from alambic.losses.divergences import distribution_divergence
from alambic.recipes.distilbert import DistilBERTLossConfig, DistilBERTRecipe, distilbert_row_counts
from tiny import chat_records, chat_tokenizer, sample_texts, save_chat_teacher_and_data, tiny_llama


@pytest.fixture(scope="module")
def chat_dir(tmp_path_factory):
    return save_chat_teacher_and_data(tmp_path_factory.mktemp("chat"))


def _distill(chat_dir, out, *extra):
    return main(["distill", "--teacher", str(chat_dir / "teacher"), "--data", str(chat_dir / "chat.jsonl"),
                 "--out", str(out), "--layers", "0,3", "--batch-size", "4", "--max-length", "256", "--no-progress",
                 "--set", "loss.alpha_cos=0", "--set", "training.log_every=1", "--set", "training.schedule=constant",
                 "--set", "training.warmup_ratio=0", *extra])


def _metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("divergence", ["reverse_kl", "jsd"])
def test_objective_on_chat_batches_is_the_divergence_on_assistant_rows(chat_dir, divergence):
    tok = chat_tokenizer()
    cfg = load_config(None, [{"teacher": "t", "out": "o", "data": {"train": [str(chat_dir / "chat.jsonl")],
                                                                    "max_length": 256}}])
    batch = training_batches(cfg.data.train, tok, "causal", cfg.data, None, batch_size=4, seed=0)(0)
    teacher = tiny_llama(vocab_size=len(tok), seed=1)
    student = tiny_llama(vocab_size=len(tok), seed=2).train()
    loss_cfg = DistilBERTLossConfig(alpha_kd=1.0, alpha_lm=0.0, alpha_cos=0.0, kd_rows="masked", temperature=2.0,
                                    divergence=divergence)
    recipe = DistilBERTRecipe(teacher, student, loss_cfg)
    counts = {k: torch.tensor(float(v)) for k, v in recipe.row_counts(batch).items()}
    assert counts["kd"] == len(batch["lm_positions"]) < len(batch["token_positions"]) / 4
    loss, terms = recipe.objective(batch, recipe.teacher_targets(batch), counts)
    rows = batch["lm_positions"]
    with torch.no_grad():
        t_logits = teacher(batch["input_ids"], attention_mask=batch["attention_mask"]).logits.flatten(0, 1)[rows]
    s_logits = student(batch["input_ids"], attention_mask=batch["attention_mask"]).logits.flatten(0, 1)[rows]
    direct = distribution_divergence(s_logits, t_logits, divergence, temperature=2.0)
    torch.testing.assert_close(loss, direct, rtol=1e-4, atol=1e-5)


def test_distill_on_chat_data_reports_and_evaluates_answers(chat_dir, tmp_path, capsys):
    assert _distill(chat_dir, tmp_path / "run", "--max-steps", "2", "--eval-data", str(chat_dir / "chat.jsonl"),
                    "--divergence", "skew_reverse_kl") == 0
    out = capsys.readouterr().out
    assert "chat data: 12 conversations, loss on assistant tokens only" in out
    config = (tmp_path / "run" / "config.yaml").read_text()
    assert "kd_rows: masked" in config and "divergence: skew_reverse_kl" in config
    assert "lr: 0.0003" in config and "training.lr=0.0003: the default for a decoder on chat data" in out
    assert "temperature: 1.0" in config and "loss.temperature=1: the default for a decoder on chat data" in out
    assert (tmp_path / "run" / "student" / "config.json").exists()
    assert _metrics(tmp_path / "run")[0]["eval/tokens"] < 200  # the answers' tokens, not the prompts'


def test_print_config_shows_what_distill_fits_to_the_teacher_and_data(chat_dir, text_dir, capsys):
    """--print-config is the configuration distill trains with: the decoder's learning rate, temperature, cosine
    weight and warm-up for chat data or raw text and the soft targets' rows, each resolved from the teacher's config
    and the data; set values are kept."""
    import yaml

    def printed(data, *extra):
        assert main(["distill", "--teacher", str(chat_dir / "teacher"), "--data", str(data), "--out", "o",
                     "--print-config", *extra]) == 0
        config = yaml.safe_load(capsys.readouterr().out)
        return (config["training"]["lr"], config["loss"]["temperature"], config["loss"]["alpha_cos"],
                config["training"]["warmup_ratio"], config["loss"]["kd_rows"])

    assert printed(chat_dir / "chat.jsonl") == (3e-4, 1.0, 0.0, 0.1, "masked")
    assert printed(text_dir) == (1e-3, 2.0, 1.0, 0.05, "tokens")
    assert printed(chat_dir / "chat.jsonl", "--lr", "5e-4", "--set", "loss.temperature=2", "--set", "loss.alpha_cos=1",
                   "--set", "training.warmup_ratio=0") == (5e-4, 2.0, 1.0, 0.0, "masked")


def test_teacher_written_answers_distil_at_their_own_temperature(chat_dir, tmp_path, capsys):
    """`alambic generate`'s output (its manifest beside the data) keeps T = 2, the same records elsewhere take the
    chat default T = 1; a set temperature wins; the run's log says which default applied."""
    import shutil

    import yaml

    written = tmp_path / "written"
    assert main(["generate", "--teacher", str(chat_dir / "teacher"), "--prompts", str(chat_dir / "chat.jsonl"),
                 "--out", str(written), "--max-new-tokens", "8", "--temperature", "1", "--max-prompts", "8",
                 "--no-progress"]) == 0
    (tmp_path / "copied").mkdir()
    shutil.copy(written / "data.jsonl", tmp_path / "copied" / "data.jsonl")
    capsys.readouterr()

    def temperature(data, *extra):
        assert main(["distill", "--teacher", str(chat_dir / "teacher"), "--data", str(data), "--out", "o",
                     "--print-config", *extra]) == 0
        config = yaml.safe_load(capsys.readouterr().out)
        assert config["training"]["lr"] == 3e-4  # chat data, not raw text
        return config["loss"]["temperature"]

    assert temperature(written / "data.jsonl") == 2.0
    assert temperature(tmp_path / "copied" / "data.jsonl") == 1.0
    assert temperature(written / "data.jsonl", "--set", "loss.temperature=1") == 1.0
    assert temperature(written) == 2.0  # generate's folder as data: its conversations, not its manifest
    assert main(["distill", "--teacher", str(chat_dir / "teacher"), "--data", str(written), "--out",
                 str(tmp_path / "run"), "--layers", "0,3", "--batch-size", "4", "--max-length", "256", "--max-steps",
                 "1", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert ("loss.temperature=2: the default for a decoder on teacher-written chat data (`alambic generate`'s output)"
            in out)
    assert "loss.alpha_cos=0: the default for a decoder on chat data" in out
    assert "training.warmup_ratio=0.1: the default for a decoder on chat data" in out


def test_layers_measured_on_chat_data_count_every_token_read(chat_dir, tmp_path, capsys):
    """Influence reads the whole conversation, the loss scores the answers: the card names both counts."""
    assert main(["init-student", "--teacher", str(chat_dir / "teacher"), "--layers", "auto:influence", "--depth", "2",
                 "--calibration-data", str(chat_dir / "chat.jsonl"), "--calibration-tokens", "512", "--max-length", "256",
                 "--out", str(tmp_path / "student")]) == 0
    card = (tmp_path / "student" / "README.md").read_text()
    read, scored = map(int, re.search(r"calibration: (\d+) tokens \((\d+) scored by the loss\)", card).groups())
    assert 0 < scored < read and f"calibration: {read} tokens ({scored} scored by the loss)" in capsys.readouterr().out


def _weights(out):
    return load_file(str(out / "student" / "model.safetensors"))


def test_on_policy_steps_sample_and_resume_exactly(chat_dir, tmp_path):
    on_policy = ["--set", "on_policy.lmbda=1", "--set", "on_policy.max_new_tokens=8", "--divergence", "jsd",
                 "--set", "training.save_every=2"]
    assert _distill(chat_dir, tmp_path / "straight", "--max-steps", "4", *on_policy) == 0
    card = (tmp_path / "straight" / "student" / "README.md").read_text()
    assert "- on-policy (GKD): with probability 1 a batch's answers were sampled from the student" in card
    assert "divergence = jsd" in card
    logged = _metrics(tmp_path / "straight")
    assert all(0 < m["generate_share"] < 1 for m in logged if "generate_share" in m)
    assert sum("generate_share" in m for m in logged) == 4
    assert _distill(chat_dir, tmp_path / "resumed", "--max-steps", "2", *on_policy) == 0
    assert _distill(chat_dir, tmp_path / "resumed", "--max-steps", "4", "--resume", *on_policy) == 0
    straight, resumed = _weights(tmp_path / "straight"), _weights(tmp_path / "resumed")
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


def test_on_policy_batches_are_the_students_answers_to_the_prompts(chat_dir):
    tok = chat_tokenizer()
    cfg = load_config(None, [{"teacher": "t", "out": "o", "data": {"train": [str(chat_dir / "chat.jsonl")],
                                                                    "max_length": 256},
                              "on_policy": {"lmbda": 1.0, "max_new_tokens": 5, "temperature": 0}}])
    source = training_batches(cfg.data.train, tok, "causal", cfg.data, None, batch_size=3, seed=0)
    student = tiny_llama(vocab_size=len(tok), seed=3)
    batches = OnPolicyBatches(source, student, cfg.on_policy, eos_token_ids=[tok.eos_token_id],
                              pad_token_id=tok.pad_token_id, max_length=256, seed=0)
    batch = batches(0)
    examples = source.examples_at(0)
    for row, example in enumerate(examples):
        prompt = example.ids[:example.prompt_length].tolist()
        length = int(batch["attention_mask"][row].sum())
        assert batch["input_ids"][row, :len(prompt)].tolist() == prompt
        answer = batch["input_ids"][row, len(prompt):length]
        greedy = student.generate(torch.tensor([prompt]), max_new_tokens=5, do_sample=False,
                                  eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)[0, len(prompt):]
        assert answer.tolist() == greedy.tolist()[:len(answer)]
    # targets: every answer token, and nothing of the prompts
    assert len(batch["lm_targets"]) == int(batch["attention_mask"].sum()) - sum(e.prompt_length for e in examples)
    assert batches.generation_seconds > 0
    assert isinstance(examples[0], ChatExample)
    # GKD: the divergence alone on the student's samples, no cross-entropy towards them
    loss = DistilBERTLossConfig(kd_rows="masked")
    assert distilbert_row_counts(batch, loss) == {"kd": len(batch["lm_positions"]), "lm": 0,
                                                  "cos": len(batch["token_positions"])}
    assert distilbert_row_counts(source(0), loss)["lm"] == len(source(0)["lm_positions"])


def test_finetune_chat_keeps_the_best_answer_perplexity(chat_dir, tmp_path, capsys):
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in chat_records(40)))
    code = main(["finetune", "--task", "chat", "--model", str(chat_dir / "teacher"), "--train", str(data), "--out", str(tmp_path / "sft"), "--max-steps", "3", "--eval-every", "2",
                 "--batch-size", "4", "--max-length", "256", "--no-progress"])
    assert code == 0
    summary = json.loads((tmp_path / "sft" / "task.json").read_text())
    assert summary["task"] == "chat" and summary["steps"] == 3
    assert (tmp_path / "sft" / "best" / "config.json").exists()
    assert (tmp_path / "sft" / "data" / "validation.jsonl").exists()
    assert "best validation perplexity of the answers" in capsys.readouterr().out


def test_finetune_lm_adapts_a_decoder_to_raw_text_and_keeps_the_best(chat_dir, tmp_path, capsys):
    """finetune --task lm: next-token cross-entropy on packed raw-text blocks, a stable 10% of the documents held
    out, the model of the lowest validation perplexity kept in OUT/best."""
    folder = tmp_path / "text"
    folder.mkdir()
    for i, text in enumerate(sample_texts(40)):
        (folder / f"{i:02d}.txt").write_text(text)
    code = main(["finetune", "--task", "lm", "--model", str(chat_dir / "teacher"), "--train", str(folder), "--out",
                 str(tmp_path / "lm"), "--max-steps", "4", "--eval-every", "2", "--batch-size", "4", "--max-length",
                 "64", "--lr", "1e-3", "--no-progress"])
    assert code == 0
    out = capsys.readouterr().out
    assert "raw text: " in out and "blocks of 64" in out
    assert re.search(r"best validation perplexity: [0-9.]+; model in ", out)
    summary = json.loads((tmp_path / "lm" / "task.json").read_text())
    assert summary["task"] == "lm" and summary["steps"] == 4
    validated = [m["eval/perplexity"] for m in _metrics(tmp_path / "lm") if "eval/perplexity" in m]
    assert len(validated) >= 2 and summary["best_validation_perplexity"] == pytest.approx(min(validated))
    held, kept = (sorted(p.name for p in (tmp_path / "lm" / "data" / part).iterdir()) for part in ("validation", "train"))
    assert held and len(held) + len(kept) == 40 and not set(held) & set(kept)
    assert (tmp_path / "lm" / "best" / "model.safetensors").exists()
    code = main(["finetune", "--task", "lm", "--model", "minilm-l6", "--train", str(folder), "--out",
                 str(tmp_path / "encoder")])
    err = capsys.readouterr().err
    assert code == 2 and "minilm-l6 is an encoder: --task lm fine-tunes decoders" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "encoder" / "data").exists()


@pytest.mark.parametrize("extra, message", [
    (["--set", "on_policy.lmbda=0.5"], "on_policy.lmbda > 0 has the student answer the prompts of chat data"),
    (["--divergence", "reverse_kll"], "did you mean 'reverse_kl'"),
    (["--set", "on_policy.lmbda=1", "--set", "loss.alpha_kd=0"], "loss.alpha_kd is 0"),
    (["--divergence", "jsd", "--set", "loss.divergence_param=1.5"], "loss.divergence_param must be in [0, 1]"),
    (["--divergence", "tvd", "--divergence-param", "0.5"], "tvd"),
])
def test_bad_chat_options_are_one_line(chat_dir, tmp_path, capsys, extra, message):
    text = tmp_path / "text.txt"
    text.write_text("plain text " * 200)
    code = main(["distill", "--teacher", str(chat_dir / "teacher"), "--data", str(text), "--out",
                 str(tmp_path / "run"), *extra])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_a_chat_cache_at_k_v_trains_like_the_live_teacher(chat_dir, tmp_path):
    """cache-teacher stores conversations with their assistant targets, so offline distillation stays
    completion-only: with every class kept the first step's loss equals the live teacher's."""
    vocab = len(chat_tokenizer())
    assert main(["cache-teacher", "--teacher", str(chat_dir / "teacher"), "--data", str(chat_dir / "chat.jsonl"),
                 "--out", str(tmp_path / "cache"), "--top-k", str(vocab), "--temperature", "1",
                 "--max-length", "256", "--cache-format", "1"]) == 0  # float16: the compact format is tested apart
    manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    assert manifest["chat"] is True
    common = ["--max-steps", "1", "--divergence", "reverse_kl", "--set", "loss.alpha_lm=0", "--layers", "0",
              "--set", "loss.temperature=1"]
    assert _distill(chat_dir, tmp_path / "live", *common) == 0
    assert main(["distill", "--teacher-logits", str(tmp_path / "cache"), "--teacher", str(chat_dir / "teacher"),
                 "--out", str(tmp_path / "offline"), "--batch-size", "4", "--no-progress",
                 "--max-length", "256", "--set", "loss.alpha_cos=0", "--set", "training.log_every=1", *common]) == 0
    live, offline = _metrics(tmp_path / "live")[0], _metrics(tmp_path / "offline")[0]
    assert offline["tokens"] == live["tokens"]
    # the tiny teacher is near uniform (log p ~ -6.2), where fp16 storage rounds log p by up to 2e-3: a few 1e-6
    assert offline["loss/kd"] == pytest.approx(live["loss/kd"], abs=2e-5)
    assert offline["loss/kd"] > 1e-4
    assert "kd_rows: masked" in (tmp_path / "offline" / "config.yaml").read_text()


def test_chat_features_compose_pruned_on_policy_jsd_student_exports_to_gguf(chat_dir, tmp_path):
    """A student narrowed by importance measured on the chat data, layers measured on it too, distilled with JSD
    and on-policy batches, ships as GGUF, and the export agrees with PyTorch."""
    assert _distill(chat_dir, tmp_path / "run", "--max-steps", "2", "--layers", "auto:influence",
                    "--set", "student.hidden_size=16", "--divergence", "jsd", "--set", "on_policy.lmbda=0.5",
                    "--set", "on_policy.max_new_tokens=4") == 0
    card = (tmp_path / "run" / "student" / "README.md").read_text()
    assert "hidden channels: 16 of 32 kept by mean |norm output|" in card
    assert main(["export", str(tmp_path / "run"), "--format", "gguf", "--out", str(tmp_path / "gguf")]) == 0
    manifest = json.loads((tmp_path / "gguf" / "alambic-export.json").read_text())
    assert all(check["top1_agreement"] == 1.0 for check in manifest["parity"])
