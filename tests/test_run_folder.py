"""The run folder: refused before any model loads when it cannot be written, locked while a run uses it (a second
run stops and names the first one's process), and a stale lock of a killed run taken over."""

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from alambic.cli import main
from alambic.engine.run_folder import LOCK, hold_run_folder
from alambic.errors import AlambicError
from tiny import save_llama_teacher_and_text

ENV = {**os.environ, "TRANSFORMERS_VERBOSITY": "error"}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("run-folder")
    save_llama_teacher_and_text(root)
    return root


def distill_cmd(files, out, steps=2):
    return [sys.executable, "-m", "alambic", "distill", "--teacher", str(files / "teacher"), "--data",
            str(files / "text.txt"), "--out", str(out), "--max-steps", str(steps), "--layers", "every-other",
            "--set", "data.max_length=32", "--no-progress"]


def write_lock(out, pid):
    out.mkdir(parents=True, exist_ok=True)
    (out / LOCK).write_text(json.dumps({"pid": pid, "host": socket.gethostname(), "started": "earlier"}))


def test_an_output_folder_that_cannot_be_created_is_refused_before_any_model_loads(files, tmp_path, capsys):
    (tmp_path / "a-file").write_text("")
    code = main(["distill", "--teacher", "no-such-teacher", "--data", str(files / "text.txt"),
                 "--out", str(tmp_path / "a-file" / "run")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.strip() == (f"alambic: error: cannot write to --out {tmp_path / 'a-file' / 'run'}: Not a directory; "
                           "choose a folder you can write to")


def test_a_refused_run_leaves_no_empty_folder_behind(files, tmp_path, capsys):
    assert main(["distill", "--teacher", "no-such-teacher", "--data", str(files / "text.txt"),
                 "--out", str(tmp_path / "new")]) == 2
    assert "unknown teacher" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()


def test_a_live_lock_stops_a_second_run_and_names_the_first_process(files, tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        write_lock(tmp_path / "run", holder.pid)
        result = subprocess.run(distill_cmd(files, tmp_path / "run"), capture_output=True, text=True, env=ENV,
                                timeout=120)
    finally:
        holder.kill()
        holder.wait()
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip() == (f"alambic: error: {tmp_path / 'run'} is in use by another alambic run (process "
                                     f"{holder.pid}, started earlier): wait for it to finish, stop it, or give "
                                     "another --out")
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_a_stale_lock_of_a_killed_run_is_taken_over(files, tmp_path, capsys):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    write_lock(tmp_path / "run", dead.pid)
    assert main(distill_cmd(files, tmp_path / "run")[3:]) == 0
    assert f"taking over the stale lock of {tmp_path / 'run'} (process {dead.pid} is no longer running)" in (
        capsys.readouterr().out)
    assert (tmp_path / "run" / "student" / "config.json").is_file()
    assert not (tmp_path / "run" / LOCK).exists()  # released at the end


def test_a_lock_held_on_another_host_is_not_guessed_at(tmp_path):
    (tmp_path / LOCK).write_text(json.dumps({"pid": 1, "host": "elsewhere", "started": "earlier"}))
    with pytest.raises(AlambicError, match=r"locked by an alambic run on host elsewhere .* delete .*\.alambic\.lock"):
        with hold_run_folder(tmp_path):
            pass


def test_two_real_runs_on_one_folder_at_once(files, tmp_path):
    """The first run holds the folder; the second, started while it runs, stops at once; the first finishes."""
    first = subprocess.Popen(distill_cmd(files, tmp_path / "run", steps=300), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=ENV)
    try:
        deadline = time.monotonic() + 60
        while not (tmp_path / "run" / LOCK).exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        second = subprocess.run(distill_cmd(files, tmp_path / "run"), capture_output=True, text=True, env=ENV,
                                timeout=120)
        out, err = first.communicate(timeout=300)
    finally:
        first.kill()
    assert second.returncode == 2
    assert f"is in use by another alambic run (process {first.pid}" in second.stderr
    assert first.returncode == 0, err[-2000:]
    assert (tmp_path / "run" / "student" / "config.json").is_file() and not (tmp_path / "run" / LOCK).exists()


def _take_over(out, barrier, results):
    """One of two processes racing for a stale lock: both start together, the winner holds it until both have tried."""
    try:
        with hold_run_folder(out, say=lambda line: None):
            barrier.wait(timeout=30)  # both have tried before the winner lets go
            results.put("held")
            barrier.wait(timeout=30)
    except AlambicError as error:
        barrier.wait(timeout=30)
        results.put(str(error))
        barrier.wait(timeout=30)


def test_two_takeovers_of_one_stale_lock_cannot_both_succeed(tmp_path):
    import multiprocessing

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    context = multiprocessing.get_context("fork")
    for attempt in range(5):  # the race, run several times
        out = tmp_path / f"run{attempt}"
        write_lock(out, dead.pid)
        barrier, results = context.Barrier(2), context.Queue()
        racers = [context.Process(target=_take_over, args=(out, barrier, results)) for _ in range(2)]
        for racer in racers:
            racer.start()
        outcomes = sorted(results.get(timeout=60) for _ in racers)
        for racer in racers:
            racer.join(timeout=30)
        assert outcomes[1] == "held", outcomes
        assert outcomes[0].startswith(f"{out} is in use by another alambic run (process "), outcomes


def test_a_lock_being_written_is_not_taken_over_as_stale(tmp_path):
    # a run that created the lock file and holds it, but has not written its record yet (empty file)
    import fcntl

    (tmp_path / LOCK).touch()
    fd = os.open(tmp_path / LOCK, os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        with pytest.raises(AlambicError, match="is in use by another alambic run \\(its record is being written\\)"):
            with hold_run_folder(tmp_path, say=lambda line: None):
                pass
        assert (tmp_path / LOCK).exists()  # the holder's file is left alone
    finally:
        os.close(fd)


# --- disk space -----------------------------------------------------------------------------------------------------

def test_a_run_says_what_a_checkpoint_takes_and_the_space_left(files, tmp_path, capsys):
    assert main(distill_cmd(files, tmp_path / "run")[3:] + ["--set", "training.save_every=1"]) == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("checkpoint step-")]
    assert len(lines) == 1, out  # said once, at the first save
    size = sum(f.stat().st_size for f in (tmp_path / "run" / "checkpoints" / "step-0000001").rglob("*") if f.is_file())
    assert lines[0].startswith(f"checkpoint step-0000001: {size / 1e6:.1f} MB; the run keeps the last 2 and its "
                               "best model, with ")
    assert lines[0].endswith(" left on the device")
    assert "held-out before training" not in out  # no held-out data given


def test_a_run_that_would_fill_the_disk_refuses_to_start_and_writes_nothing(files, tmp_path, capsys):
    # a margin larger than any disk: the first checkpoint could never be saved
    argv = distill_cmd(files, tmp_path / "run")[3:] + ["--set", "training.min_free_disk_mb=1000000000"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("alambic: error: not starting: ") and "free on the device of" in err
    assert "lower training.keep_checkpoints or training.min_free_disk_mb" in err and "\n" not in err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_the_disk_guard_compares_free_space_with_a_checkpoint_and_the_margin(tmp_path):
    from alambic.engine.disk import DiskGuard, free_bytes

    free = free_bytes(tmp_path)
    assert DiskGuard(tmp_path, estimate=1, margin_mb=0, keep=2).problem("saving") is None
    assert DiskGuard(tmp_path, estimate=2 * free, margin_mb=0, keep=2).problem("saving").startswith("not saving: ")
    assert DiskGuard(tmp_path, estimate=1, margin_mb=2 * free // 2**20 + 1, keep=2).problem("saving") is not None
    guard = DiskGuard(tmp_path, estimate=2 * free, margin_mb=0, keep=2)
    (tmp_path / "step-0000001").mkdir()
    (tmp_path / "step-0000001" / "weights").write_bytes(b"x" * 1000)
    assert guard.saved(tmp_path / "step-0000001").startswith("checkpoint step-0000001: 0.0 MB;")
    assert guard.checkpoint == 1000 and guard.problem("saving") is None  # the measured size replaces the estimate
    assert guard.saved(tmp_path / "step-0000001") is None  # said once


def test_resuming_a_finished_run_says_so_before_loading_anything(files, tmp_path, capsys):
    argv = distill_cmd(files, tmp_path / "run")[3:]
    assert main(argv) == 0
    capsys.readouterr()
    assert main(argv + ["--resume"]) == 0
    out = capsys.readouterr().out
    assert out.strip() == (f"{tmp_path / 'run'} is complete: trained to step 2 of training.max_steps=2, its student "
                           f"is in {tmp_path / 'run' / 'student'}; raise --max-steps to train on")
