"""Every benchmark script imports what it uses and answers --help (their figures live in docs/benchmarks.md)."""

import runpy
import sys
from pathlib import Path

import pytest

SCRIPTS = sorted((Path(__file__).parent.parent / "benchmarks").glob("*.py"))


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_benchmark_script_answers_help(script, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", [str(script), "--help"])
    monkeypatch.syspath_prepend(str(script.parent))  # as `python benchmarks/X.py` runs it: its folder on sys.path
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(str(script), run_name="__main__")
    assert exit_.value.code == 0 and "usage:" in capsys.readouterr().out


@pytest.mark.slow  # builds the chat data and converts SmolLM2's tokenizer: about a minute
def test_the_gpu_check_passes_its_dry_run_on_the_cpu():
    """benchmarks/gpu_check.sh is run when a GPU is lent; until then its checks run here on tiny shapes."""
    import os
    import subprocess

    root = Path(__file__).parent.parent
    done = subprocess.run(["bash", str(root / "benchmarks" / "gpu_check.sh"), "--dry-run"], capture_output=True,
                          text=True, timeout=300, env={**os.environ, "PY": sys.executable, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    table = done.stdout[done.stdout.index("| check |"):].splitlines()
    assert [line.split(" | ")[0] for line in table[2:]] == [
        "| bf16 parity of a step", "| fused vocabulary loss vs full logits", "| one on-policy (GKD) step",
        "| throughput 0.00B -> 0.00B, 2 x 64 bf16"]
    assert all(line.endswith("| yes |") for line in table[2:])


def test_the_chat_benchmark_refuses_a_teacher_run_that_holds_no_teacher(tmp_path, monkeypatch, capsys):
    """--teacher-run reuses a finished teacher (students of another shape meet the same one); a folder without one is
    refused in one line before any work, and a finished run's folder is taken."""
    script = Path(__file__).parent.parent / "benchmarks" / "chat_distillation.py"
    monkeypatch.syspath_prepend(str(script.parent))
    teacher = tmp_path / "teacher"
    teacher.mkdir()
    argv = [str(script), "--out", str(tmp_path / "out"), "--teacher-run", str(teacher), "--data-only"]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(str(script), run_name="__main__")
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and "--teacher-run" in err[-1] and "no best/config.json" in err[-1]
    assert not (tmp_path / "out").exists()
    (teacher / "best").mkdir()
    (teacher / "best" / "config.json").write_text("{}")
    runpy.run_path(str(script), run_name="__main__")  # accepted: only the data is written (--data-only)
    assert (tmp_path / "out" / "data" / "test.jsonl").is_file()
