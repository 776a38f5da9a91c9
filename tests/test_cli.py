"""The alambic command end to end on tiny real models and real text files; every user error is one line, exit 2."""

import json
import subprocess
import sys

import pytest
import transformers
import yaml

from alambic.cli import main
from tiny import bpe_tokenizer, sample_texts, tiny_bert, tiny_llama, wordpiece_tokenizer


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    tiny_llama().save_pretrained(root / "llama")
    bpe_tokenizer().save_pretrained(root / "llama")
    tiny_bert().save_pretrained(root / "bert")
    wordpiece_tokenizer().save_pretrained(root / "bert")
    other = tiny_llama(vocab_size=600)
    other.save_pretrained(root / "other-vocab")
    bpe_tokenizer(600).save_pretrained(root / "other-vocab")
    texts = sample_texts(16)
    (root / "text").mkdir()
    for i, text in enumerate(texts[:12]):
        (root / "text" / f"{i}.txt").write_text(text)
    (root / "heldout.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[12:]))
    (root / "empty").mkdir()
    (root / "empty" / "a.txt").write_text("   \n\n")
    return root


def run(argv, capsys):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("teacher", ["llama", "bert"])
def test_distill_then_eval(teacher, files, tmp_path, capsys):
    out = tmp_path / "run"
    code, stdout, _ = run(["distill", "--teacher", files / teacher, "--data", files / "text",
                           "--eval-data", files / "heldout.jsonl", "--out", out, "--max-steps", 3,
                           "--set", "data.max_length=32", "--set", "student.save_init=true", "--no-progress"], capsys)
    assert code == 0, stdout
    before, after = stdout.index("held-out before training: loss "), stdout.index("held-out after training")
    assert before < after
    if teacher == "llama":  # the default for a decoder: layers measured on the training data (auto:influence)
        assert "keep the 2 most influential layers" in stdout
    else:  # for an encoder: every-other, the first and last layers kept
        assert "layers kept: 0, 3" in stdout
    auto = transformers.AutoModelForCausalLM if teacher == "llama" else transformers.AutoModelForMaskedLM
    student = auto.from_pretrained(out / "student")
    assert student.config.num_hidden_layers == 2
    assert not any(p.name.startswith(("optimizer", "trainer", "objective")) for p in (out / "student").iterdir())
    log = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {"loss/kd", "loss/lm", "loss/cos", "lr", "tokens_per_s"} <= set(log[1])
    # training.lr unset: decoders train at the decoder default, encoders at DistilBERT's
    lr = yaml.safe_load((out / "config.yaml").read_text())["training"]["lr"]
    assert lr == (1e-3 if teacher == "llama" else 5e-4)
    assert ("training.lr=0.001: the default for a decoder on raw text" in stdout) == (teacher == "llama")

    code, stdout, _ = run(["eval-lm", files / teacher, out / "student-init", out / "student",
                           "--data", files / "heldout.jsonl", "--max-length", 32, "--json"], capsys)
    assert code == 0
    rows = json.loads(stdout)
    assert [r["model"] for r in rows] == [str(files / teacher), str(out / "student-init"), str(out / "student")]
    assert rows[0]["parameters"] > rows[2]["parameters"] and all(r["perplexity"] > 1 for r in rows)
    assert ("masked_accuracy" in rows[0]) == (teacher == "bert")
    code, stdout, _ = run(["eval-lm", files / teacher, "--data", files / "heldout.jsonl", "--max-length", 32], capsys)
    assert code == 0 and "perplexity" in stdout.splitlines()[0]


def test_init_student_prints_parameter_counts(files, tmp_path, capsys):
    code, stdout, _ = run(["init-student", "--teacher", files / "llama", "--out", tmp_path / "s", "--layers", "linspace:3"], capsys)
    assert code == 0 and "teacher" in stdout and "student" in stdout and "layers kept: 0, 2, 3" in stdout
    assert transformers.AutoConfig.from_pretrained(tmp_path / "s").num_hidden_layers == 3


def bad_inputs(files):
    base = ["distill", "--teacher", files / "llama", "--data", files / "text", "--max-steps", 2, "--set",
            "data.max_length=32", "--no-progress"]
    return {
        "missing data path": (base[:3] + ["--data", files / "nope.txt"] + base[5:], "nope.txt"),
        "unknown teacher": (["distill", "--teacher", "smolm2-135m", "--data", files / "text"], "did you mean 'smollm2-135m'"),
        "no usable text": (base[:3] + ["--data", files / "empty"] + base[5:], "no usable text"),
        "deeper student": (base + ["--layers", "linspace:6"], "deeper than its teacher"),
        "layer out of range": (base + ["--layers", "0,9"], "out of range"),
        "vocabulary mismatch": (base + ["--student", files / "other-vocab"], "does not match the teacher"),
        "nan loss": (base + ["--lr", "1e30", "--set", "training.grad_clip=0", "--set", "training.log_every=1"], "NaN"),
        "unknown option": (base + ["--set", "loss.temprature=3"], "did you mean 'loss.temperature'"),
        "missing model for eval": (["eval-lm", files / "nope", "--data", files / "text"], "nope"),
        "zero hidden size": (["init-student", "--teacher", files / "llama", "--out", files / "never", "--hidden-size", 0,
                              "--width-init", "random"], "--hidden-size must be >= 1, got 0"),
        "negative heads": (["init-student", "--teacher", files / "llama", "--out", files / "never", "--num-heads", -2,
                            "--width-init", "random"], "--num-heads must be >= 1, got -2"),
    }


@pytest.mark.parametrize("case", [
    "missing data path", "unknown teacher", "no usable text", "deeper student", "layer out of range",
    "vocabulary mismatch", "nan loss", "unknown option", "missing model for eval", "zero hidden size",
    "negative heads"])
def test_bad_input_is_one_line_and_exit_2(case, files, tmp_path, capsys):
    argv, message = bad_inputs(files)[case]
    if argv[0] == "distill":
        argv = argv + ["--out", tmp_path / "run"]
    code, _, err = run(argv, capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("alambic: error: ") and message in lines[0], err
    assert "Traceback" not in err


def test_rerun_into_an_existing_run_needs_resume(files, tmp_path, capsys):
    argv = ["distill", "--teacher", files / "llama", "--data", files / "text", "--out", tmp_path / "run",
            "--max-steps", 2, "--set", "data.max_length=32", "--no-progress"]
    assert run(argv, capsys)[0] == 0
    code, _, err = run(argv, capsys)
    assert code == 2 and "--resume" in err
    assert run(argv + ["--resume"], capsys)[0] == 0



def test_a_learning_rate_the_user_sets_is_kept_for_a_decoder(files, tmp_path, capsys):
    code, stdout, _ = run(["distill", "--teacher", files / "llama", "--data", files / "text", "--out", tmp_path / "run",
                           "--max-steps", 1, "--lr", "2e-4", "--set", "data.max_length=32", "--no-progress"], capsys)
    assert code == 0 and "the default for a decoder" not in stdout
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["training"]["lr"] == 2e-4


def test_another_recipe_on_a_decoder_keeps_the_default_learning_rate(files, tmp_path, capsys):
    # the decoder rates were chosen for the distilbert recipe's losses; TinyBERT's were not measured at them
    code, stdout, _ = run(["distill", "--recipe", "tinybert", "--teacher", files / "llama", "--data", files / "text",
                           "--out", tmp_path / "run", "--max-steps", 1, "--set", "data.max_length=32", "--no-progress"],
                          capsys)
    assert code == 0 and "the default for a decoder" not in stdout
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["training"]["lr"] == 5e-4


def test_real_process_exit_code_and_no_traceback(files):
    result = subprocess.run([sys.executable, "-m", "alambic", "distill", "--teacher", "no-such-teacher", "--data",
                             str(files / "text"), "--out", "x"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.startswith("alambic: error: unknown teacher") and "Traceback" not in result.stderr


def test_help_lists_every_option(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["distill", "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "loss.alpha_kd" in out and "training.grad_accum" in out and "--resume" in out


@pytest.mark.parametrize("error, shown", [
    (OSError(28, "No space left on device"), "alambic: error: OSError: [Errno 28] No space left on device (rerun "
                                             "with --debug for the traceback)"),
    (json.JSONDecodeError("Expecting value", "{", 1), "alambic: error: JSONDecodeError: Expecting value: line 1 "
                                                       "column 2 (char 1) (rerun with --debug for the traceback)"),
])
def test_library_errors_a_user_causes_are_one_line_and_debug_shows_the_traceback(error, shown, files, tmp_path,
                                                                                 capsys, monkeypatch):
    import alambic.workflows.distill

    def fails(*args, **kwargs):
        raise error

    monkeypatch.setattr(alambic.workflows.distill, "distill", fails)
    argv = ["distill", "--teacher", files / "llama", "--data", files / "text", "--out", tmp_path / "run"]
    code, _, err = run(argv, capsys)
    assert code == 2 and err.strip() == shown
    with pytest.raises(type(error)):
        run(["--debug", *argv], capsys)
    monkeypatch.setenv("ALAMBIC_DEBUG", "1")
    with pytest.raises(type(error)):
        run(argv, capsys)


def test_a_programming_error_keeps_its_traceback(files, tmp_path, capsys, monkeypatch):
    import alambic.workflows.distill

    monkeypatch.setattr(alambic.workflows.distill, "distill", lambda *a, **k: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        run(["distill", "--teacher", files / "llama", "--data", files / "text", "--out", tmp_path / "run"], capsys)
