"""Bad input across every verb, as a new user meets it: each case exits 2 with one `alambic: error: ...` line naming
the problem (and, where there is one, the fix), never a traceback, and writes no run. The table is the evidence list
of issue 12; the cases of a single mechanism live with it too (test_config's range table, test_model_folders,
test_run_folder, test_checkpoints, test_data_tokenized)."""

import shutil
from pathlib import Path

import pytest

from alambic.cli import main
from tiny import bpe_tokenizer, sample_texts, tiny_bert, tiny_llama, wordpiece_tokenizer


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad-inputs")
    tiny_llama().save_pretrained(root / "llama")
    bpe_tokenizer().save_pretrained(root / "llama")
    tiny_bert().save_pretrained(root / "bert")
    wordpiece_tokenizer().save_pretrained(root / "bert")
    texts = sample_texts(12)
    (root / "text.txt").write_text("\n\n".join(texts[:8]))
    (root / "empty.txt").write_text("  \n")
    (root / "file").write_text("")
    (root / "bad.yaml").write_text("training: [unclosed\n")
    rows = "".join(f"\"{t[:200].replace(chr(34), '')}\",{'a' if i % 2 else 'b'}\n" for i, t in enumerate(texts))
    (root / "cls.csv").write_text("text,label\n" + rows)
    for name in ("truncated", "badjson", "noweights"):
        shutil.copytree(root / "llama", root / name)
    weights = root / "truncated" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    (root / "badjson" / "config.json").write_text("{oops")
    (root / "noweights" / "model.safetensors").unlink()
    (root / "runs").mkdir()
    return root


def cases(r):
    L, B, T, csv = r / "llama", r / "bert", r / "text.txt", r / "cls.csv"
    d = ["distill", "--teacher", L, "--data", T, "--max-steps", 1, "--set", "data.max_length=32", "--no-progress"]
    ft = ["finetune", "--task", "classification", "--model", B, "--train", csv, "--out", r / "ft"]
    dt = ["distill-task", "--task", "classification", "--teacher", B, "--train", csv, "--out", r / "dt"]
    init = ["init-student", "--teacher", L, "--out", r / "s"]
    return {
        "distill: data path missing": (d[:3] + ["--data", r / "nope.txt"] + d[5:], "no such file, folder or packaged corpus"),
        "distill: unknown teacher": (["distill", "--teacher", "smolm2", "--data", T], "did you mean 'smollm2-135m'"),
        "distill: data with no text": (d[:3] + ["--data", r / "empty.txt"] + d[5:], "no usable text"),
        "distill: deeper student": (d + ["--layers", "linspace:9"], "student deeper than its teacher (9 > 4 layers)"),
        "distill: layer out of range": (d + ["--layers", "0,9"], "layer 9 is out of range: the teacher has 4 layers"),
        "distill: unknown option": (d + ["--set", "loss.temprature=3"], "did you mean 'loss.temperature'"),
        "distill: lr 0": (d + ["--set", "training.lr=0"], "training.lr must be > 0, got 0.0"),
        "distill: batch size 0": (d + ["--set", "training.batch_size=0"], "training.batch_size must be >= 1, got 0"),
        "distill: negative temperature": (d + ["--set", "loss.temperature=-1"], "loss.temperature must be > 0"),
        "distill: mlm probability 1": (["distill", "--teacher", B, "--data", T, "--set", "loss.mlm_probability=1"],
                                       "loss.mlm_probability must be in (0, 1), got 1.0"),
        "distill: warmup ratio 1": (d + ["--set", "training.warmup_ratio=1"], "training.warmup_ratio must be in [0, 1)"),
        "distill: betas above 1": (d + ["--set", "training.betas=[0.9, 1.5]"], "training.betas must be in [0, 1)"),
        "distill: out is a file": (d + ["--out", r / "file"], "is a file; give a folder for the run"),
        "distill: out under a file": (d + ["--out", r / "file" / "run"], "Not a directory; choose a folder you can write"),
        "distill: teacher config not JSON": (["distill", "--teacher", r / "badjson", "--data", T],
                                             "badjson/config.json is not valid JSON"),
        "distill: teacher weights truncated": (["distill", "--teacher", r / "truncated", "--data", T],
                                               "truncated/model.safetensors is truncated"),
        "distill: teacher without weights": (["distill", "--teacher", r / "noweights", "--data", T],
                                             "has a config.json but no weights"),
        "distill: --resume without checkpoint": (d + ["--resume"], "no checkpoint in"),
        "distill: config file missing": (d + ["--config", r / "nope.yaml"], "nope.yaml' does not exist"),
        "distill: config not YAML": (d + ["--config", r / "bad.yaml"], "is not valid YAML"),
        "distill: --set without =": (d + ["--set", "training.lr"], "is not KEY=VALUE"),
        "distill: yes for a boolean": (d + ["--set", "training.compile=yes"], "expects true or false, got 'yes'"),
        "distill: unknown precision": (d + ["--set", "training.mixed_precision=fp8"], "auto, bf16, bf16-autocast, fp16 or no"),
        "distill: unknown recipe": (d + ["--set", "recipe=tinybrt"], "did you mean 'tinybert'"),
        "distill: all loss weights 0": (d + ["--set", "loss.alpha_kd=0", "--set", "loss.alpha_lm=0", "--set",
                                             "loss.alpha_cos=0"], "all loss weights are 0"),
        "init-student: hidden size 0": (init + ["--hidden-size", 0, "--width-init", "random"],
                                        "--hidden-size must be >= 1, got 0"),
        "init-student: negative heads": (init + ["--num-heads", -2, "--width-init", "random"],
                                         "--num-heads must be >= 1, got -2"),
        "init-student: layer out of range": (init + ["--layers", "0,99"], "layer 99 is out of range"),
        "init-student: teacher missing": (["init-student", "--teacher", r / "nope", "--out", r / "s"],
                                          "no such file or folder"),
        "init-student: --depth without auto": (init + ["--layers", "0", "--depth", 1],
                                               "--depth only applies to --layers auto"),
        "init-student: pruning without calibration": (init + ["--hidden-size", 16], "needs calibration text"),
        "init-student: truncated teacher": (["init-student", "--teacher", r / "truncated", "--out", r / "s"],
                                            "is truncated (its header is cut short)"),
        "eval-lm: model missing": (["eval-lm", r / "nope", "--data", T], "no such file or folder"),
        "eval-lm: config not JSON": (["eval-lm", r / "badjson", "--data", T], "config.json is not valid JSON"),
        "eval-lm: data missing": (["eval-lm", L, "--data", r / "nope.txt"], "no such file, folder or packaged corpus"),
        "report: truncated model": (["report", L, r / "truncated", "--data", T, "--out", r / "rep"], "is truncated"),
        "report: out is a file": (["report", L, L, "--data", T, "--out", r / "file"], "give a folder for the report"),
        "finetune: train file missing": (ft[:6] + [r / "nope.csv"] + ft[7:], "no such file or folder"),
        "finetune: batch size 0": (ft + ["--batch-size", 0], "--batch-size must be >= 1, got 0"),
        "finetune: lr 0": (ft + ["--lr", 0], "--lr must be > 0"),
        "finetune: doc stride 0": (ft + ["--doc-stride", 0], "--doc-stride must be >= 1, got 0"),
        "finetune: out under a file": (ft[:-1] + [r / "file" / "x"], "Not a directory"),
        "distill-task: no student": (dt, "give the student as one of: a folder (--student), teacher layers to copy"),
        "distill-task: teacher without a task head": (dt + ["--student-layers", "0"], "has no classification head: "
                                                      "fine-tune it first with `alambic finetune"),
        "distill-task: negative alpha": (dt + ["--student-layers", "0", "--alpha-kd", -1], "--alpha-kd must be >= 0"),
        "distill-task: temperature 0": (dt + ["--student-layers", "0", "--temperature", 0], "--temperature must be > 0"),
        "eval-task: model missing": (["eval-task", r / "nope", "--task", "classification", "--data", csv],
                                     "no such file or folder"),
        "plot-run: no metrics": (["plot-run", r / "runs"], "metrics.jsonl not found: give a run folder"),
    }


CASES = list(cases(Path("unused")))  # the names; each test builds its case under the real fixture folder


def test_the_table_covers_every_verb_with_at_least_40_cases():
    verbs = {name.split(":")[0] for name in CASES}
    assert len(CASES) >= 40
    assert {"distill", "init-student", "eval-lm", "report", "finetune", "distill-task", "eval-task", "plot-run"} <= verbs


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_line_exit_2_and_no_run(case, root, capsys):
    argv, message = cases(root)[case]
    if argv[0] == "distill" and "--out" not in argv:
        argv = argv + ["--out", root / "runs" / case.replace(" ", "-").replace(":", "")]
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("alambic: error: ") and message in lines[0], err
    assert "Traceback" not in err
    leftovers = [p for p in (root / "runs").rglob("*") if p.is_file()]
    assert leftovers == []  # a refused run writes nothing (and leaves no empty folder it made)
