"""Features in combination, each case asserting a property of the result (issue 21's matrix). Elsewhere:
pruned -> distill -> GGUF -> llama.cpp (tests/test_llama_cpp.py), offline cache -> FSDP and bf16 -> FSDP against one
process, and a DDP resume on another number of processes refused (tests/test_distributed.py)."""

import json
import math
from pathlib import Path

import pytest
import torch
import transformers

from alambic.cli import main
from alambic.evaluation.report import ReportSettings, build_report
from alambic.export.runtime import load_exported, read_manifest
from alambic.workflows.export import encode, parity
from tiny import bpe_tokenizer, sample_texts, tiny_bert, tiny_llama, wordpiece_tokenizer

DATA = Path(__file__).parent / "data"


def cli(*argv) -> int:
    return main([str(a) for a in argv])


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("composition")
    tiny_llama(hidden_size=64, intermediate_size=128).save_pretrained(root / "llama")
    bpe_tokenizer().save_pretrained(root / "llama")
    tiny_bert(num_hidden_layers=4).save_pretrained(root / "bert")
    wordpiece_tokenizer().save_pretrained(root / "bert")
    texts = sample_texts(14)
    (root / "text.txt").write_text("\n\n".join(texts[:10]))
    (root / "heldout.txt").write_text("\n\n".join(texts[10:]))
    (root / "transfer.txt").write_text("\n".join(t.split("\n")[0] for t in sample_texts(40)))
    return root


def test_pruned_then_distilled_then_onnx_int8_scores_like_pytorch_in_onnxruntime(files, tmp_path):
    # a narrower decoder sliced by importance, distilled, quantised: onnxruntime runs what PyTorch runs, within the
    # int8 bound, and the held-out perplexity moves by less than 2%
    assert cli("init-student", "--teacher", files / "llama", "--out", tmp_path / "init", "--layers", "0,3",
               "--hidden-size", 32, "--calibration-data", files / "text.txt", "--calibration-tokens", 256,
               "--max-length", 32) == 0
    assert cli("distill", "--teacher", files / "llama", "--student", tmp_path / "init", "--data", files / "text.txt",
               "--out", tmp_path / "run", "--max-steps", 2, "--batch-size", 2, "--max-length", 32,
               "--no-progress") == 0
    assert cli("export", tmp_path / "run", "--format", "onnx-int8", "--out", tmp_path / "int8") == 0
    manifest = read_manifest(tmp_path / "int8")
    assert manifest["parity_bound"]["max_mean_kl"] == 0.05 and "parity_outside_bound" not in manifest
    settings = ReportSettings(seq_lens=[16], batch_size=2, warmup=0, repeats=1, threads=1,
                              lm_data=[str(files / "heldout.txt")], max_tokens=512)
    report = build_report([str(tmp_path / "run"), str(tmp_path / "int8")], settings, log=None, warn=None)
    student, exported = report["models"]
    assert exported["runtime"] == "onnxruntime int8 dynamic"
    assert exported["quality"]["tokens"] == student["quality"]["tokens"]
    assert exported["quality"]["perplexity"] == pytest.approx(student["quality"]["perplexity"], rel=0.02)


def test_distill_task_with_a_transfer_set_then_onnx_then_report(files, tmp_path, capsys):
    # a classification teacher -> a student distilled on labelled data plus an unlabelled transfer set -> its ONNX
    # graph: the report scores the graph exactly as the PyTorch student, from the same run folder
    data = DATA / "sentiment_ko.jsonl"
    fast = ["--max-length", 64, "--batch-size", 4, "--no-progress"]
    assert cli("finetune", "--task", "classification", "--model", files / "bert", "--train", data,
               "--out", tmp_path / "teacher", "--max-steps", 3, *fast) == 0
    assert cli("distill-task", "--task", "classification", "--teacher", tmp_path / "teacher", "--student-layers",
               "0,2", "--train", data, "--unlabelled", files / "transfer.txt", "--out", tmp_path / "student",
               "--max-steps", 4, *fast) == 0
    assert "unlabelled (soft targets only)" in capsys.readouterr().out
    assert cli("export", tmp_path / "student", "--format", "onnx", "--out", tmp_path / "onnx") == 0
    assert read_manifest(tmp_path / "onnx")["source_path"] == str(tmp_path / "student" / "best")
    settings = ReportSettings(seq_lens=[16], batch_size=2, warmup=0, repeats=1, threads=1, task="classification",
                              data=[str(data)], max_length=64)
    report = build_report([str(tmp_path / "teacher"), str(tmp_path / "student"), str(tmp_path / "onnx")], settings,
                          log=None, warn=None)
    teacher, student, graph = report["models"]
    assert graph["runtime"] == "onnxruntime float32" and graph["parameters"] == student["parameters"]
    assert graph["parameters"]["total"] < teacher["parameters"]["total"]
    assert graph["quality"]["value"] == pytest.approx(student["quality"]["value"], abs=1e-9)
    # and the graph's logits are the student's on the saved tokenizer's own output
    model = load_exported(tmp_path / "onnx")
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "onnx")
    reference = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "student" / "best").eval()
    batch = encode(tokenizer, reference, [json.loads(line)["text"] for line in data.read_text().splitlines()[:6]],
                   max_length=64)
    with torch.no_grad():
        expected = {"logits": reference(**batch).logits}
    assert parity(expected, {"logits": model(**batch).logits}, batch["attention_mask"])["max_abs_diff"] < 1e-4


def test_a_budget_through_distill_task_then_report_keeps_its_promise_record(tmp_path, capsys):
    # --target-speedup instead of a shape: the search times real candidates here, distill-task trains the chosen
    # one, OUT/best carries the search, and the report judges the budget on it
    teacher_model = tiny_bert(hidden_size=256, num_attention_heads=4, intermediate_size=512, num_hidden_layers=4)
    teacher_model.save_pretrained(tmp_path / "bert")
    wordpiece_tokenizer().save_pretrained(tmp_path / "bert")
    data = DATA / "sentiment_ko.jsonl"
    fast = ["--max-length", 64, "--batch-size", 4, "--no-progress"]
    assert cli("finetune", "--task", "classification", "--model", tmp_path / "bert", "--train", data,
               "--out", tmp_path / "teacher", "--max-steps", 2, *fast) == 0
    assert cli("distill-task", "--task", "classification", "--teacher", tmp_path / "teacher", "--target-speedup", 1.5,
               "--budget-seq-len", 64, "--timing-cache", tmp_path / "cache", "--train", data,
               "--out", tmp_path / "student", "--max-steps", 2, *fast) == 0
    out = capsys.readouterr().out
    assert "| chosen |" in out and "shape search: " in out
    search = json.loads((tmp_path / "student" / "best" / "alambic-search.json").read_text())
    student = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "student" / "best")
    chosen = next(c for c in search["candidates"] if c["status"] == "chosen")
    assert chosen["key"] == search["chosen"] and chosen["timing"]["speedup"] >= 1.5
    assert (student.config.num_hidden_layers, student.config.hidden_size) == (chosen["shape"]["depth"],
                                                                              chosen["shape"]["hidden"])
    assert "## Shape search" in (tmp_path / "student" / "best" / "README.md").read_text()
    settings = ReportSettings(seq_lens=[64], batch_size=1, warmup=1, repeats=3, max_repeats=6,
                              task="classification", data=[str(data)], max_length=64)
    report = build_report([str(tmp_path / "teacher"), str(tmp_path / "student")], settings, log=None, warn=None)
    kept = report["models"][1]["budget"]
    assert kept["budget"]["speedup"] == 1.5 and kept["met"] in (True, False) and kept["measured"] > 0


def test_a_budget_through_distill_writes_the_search_with_the_student(tmp_path, capsys):
    tiny_llama(hidden_size=256, intermediate_size=512, num_attention_heads=4,
               num_key_value_heads=2).save_pretrained(tmp_path / "llama")
    bpe_tokenizer().save_pretrained(tmp_path / "llama")
    (tmp_path / "text.txt").write_text("\n\n".join(sample_texts(10)))
    assert cli("distill", "--teacher", tmp_path / "llama", "--data", tmp_path / "text.txt", "--target-speedup", 1.5,
               "--set", "student.budget_seq_len=32", "--set", f"student.timing_cache={tmp_path / 'cache'}",
               "--set", "student.calibration_tokens=256", "--set", "student.save_init=true",
               "--out", tmp_path / "run", "--max-steps", 2, "--batch-size", 2, "--max-length", 32,
               "--no-progress") == 0
    assert "shape search: " in capsys.readouterr().out
    for folder in ("student-init", "student"):
        search = json.loads((tmp_path / "run" / folder / "alambic-search.json").read_text())
        assert search["budget"]["speedup"] == 1.5 and search["budget"]["seq_len"] == 32
        assert "## Shape search" in (tmp_path / "run" / folder / "README.md").read_text()
    config = transformers.AutoConfig.from_pretrained(tmp_path / "run" / "student")
    chosen = next(c for c in search["candidates"] if c["status"] == "chosen")["shape"]
    assert (config.num_hidden_layers, config.hidden_size, config.intermediate_size) == (
        chosen["depth"], chosen["hidden"], chosen["ffn"])


def _fp32_weights(folder) -> set:
    from safetensors.torch import load_file

    return {t.dtype for t in load_file(str(Path(folder) / "model.safetensors")).values() if t.is_floating_point()}


def test_bf16_with_master_weights_through_every_training_verb(files, tmp_path, capsys):
    # training.mixed_precision=bf16 (a bf16 student, fp32 masters) with the features beside it: TinyBERT's
    # intermediate losses and projection, on-policy chat distillation, a task student, and an offline cache; each
    # run trains, and what it writes is an fp32 student (the masters), as fp32 runs write
    from tiny import save_chat_teacher_and_data

    bf16 = ["--mixed-precision", "bf16", "--no-progress"]
    assert cli("distill", "--recipe", "tinybert", "--teacher", files / "bert", "--data", files / "text.txt", "--out",
               tmp_path / "tinybert", "--max-steps", 2, "--batch-size", 2, "--max-length", 32, "--layers", "0,3",
               "--set", "student.hidden_size=16", "--set", "student.intermediate_size=32", "--set",
               "student.num_heads=4", *bf16) == 0
    chat = save_chat_teacher_and_data(tmp_path / "chat")
    assert cli("distill", "--teacher", chat / "teacher", "--data", chat / "chat.jsonl", "--out", tmp_path / "gkd",
               "--layers", "0,3", "--batch-size", 2, "--max-length", 256, "--max-steps", 2, "--set",
               "on_policy.lmbda=1", "--set", "on_policy.max_new_tokens=4", "--divergence", "jsd", "--set",
               "loss.alpha_cos=0", *bf16) == 0
    data = DATA / "sentiment_ko.jsonl"
    assert cli("finetune", "--task", "classification", "--model", files / "bert", "--train", data, "--out",
               tmp_path / "teacher", "--max-steps", 2, "--max-length", 64, *bf16) == 0
    assert cli("distill-task", "--task", "classification", "--teacher", tmp_path / "teacher", "--student-layers",
               "0,2", "--train", data, "--out", tmp_path / "task", "--max-steps", 2, "--max-length", 64, *bf16) == 0
    assert cli("cache-teacher", "--teacher", files / "llama", "--data", files / "text.txt", "--out",
               tmp_path / "cache", "--top-k", 8, "--max-length", 32) == 0
    assert cli("distill", "--teacher-logits", tmp_path / "cache", "--teacher", files / "llama", "--layers", "0,3",
               "--out", tmp_path / "offline", "--max-steps", 2, "--batch-size", 2, *bf16) == 0
    said = capsys.readouterr().out.count("mixed precision: bf16 with fp32 master weights (as configured)")
    assert said >= 5  # each run (distill-task: each stage) trained in it
    for student in ("tinybert/student", "gkd/student", "teacher/best", "task/best", "offline/student"):
        assert _fp32_weights(tmp_path / student) == {torch.float32}, student
        logs = list((tmp_path / student).parent.rglob("metrics.jsonl"))
        losses = [json.loads(line).get("loss") for log in logs for line in log.read_text().splitlines()]
        assert logs and all(math.isfinite(x) for x in losses if x is not None), student


@pytest.mark.parametrize("arch, fmt", [("bert", "onnx"), ("llama", "gguf")])
def test_a_tinybert_student_exports_as_the_student_alone_and_runs_like_pytorch(arch, fmt, files, tmp_path):
    # TinyBERT trains projections from the narrower student's width to the teacher's; the export is the student's
    # own shape and computes what the student computes in PyTorch (ONNX Runtime; GGUF read back, and in llama.cpp
    # where it is installed)
    width = {"bert": 16, "llama": 32}[arch]
    assert cli("distill", "--recipe", "tinybert", "--teacher", files / arch, "--data", files / "text.txt",
               "--out", tmp_path / "run", "--max-steps", 2, "--batch-size", 2, "--layers", "1,3", "--no-progress",
               "--set", f"student.hidden_size={width}", "--set", "student.num_heads=4",
               "--set", "data.max_length=24") == 0
    assert cli("export", tmp_path / "run", "--format", fmt, "--out", tmp_path / fmt) == 0
    manifest = read_manifest(tmp_path / fmt)
    assert "parity_outside_bound" not in manifest
    assert all(result["max_abs_diff"] < 1e-2 * max(1.0, result["max_abs_reference"]) for result in manifest["parity"])
    config = transformers.AutoConfig.from_pretrained(tmp_path / fmt)
    assert config.hidden_size == width and config.num_hidden_layers == 2
