"""Kill -9 a real `alambic distill` at random moments (seeded), often inside a checkpoint write (one per step),
then `--resume`: the student equals an uninterrupted run's bit for bit."""

import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from tiny import save_llama_teacher_and_text

ENV = {**os.environ, "TRANSFORMERS_VERBOSITY": "error", "OMP_NUM_THREADS": "1"}
STEPS = 60


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("kill")
    save_llama_teacher_and_text(root)
    return root


def command(files, out, resume=False):
    return [sys.executable, "-m", "alambic", "distill", "--teacher", str(files / "teacher"), "--data",
            str(files / "text.txt"), "--out", str(out), "--max-steps", str(STEPS), "--layers", "every-other",
            "--set", "data.max_length=32", "--set", "training.save_every=1", "--set", "training.log_every=1",
            "--set", "training.keep_checkpoints=2", "--no-progress"] + (["--resume"] if resume else [])


def student(out):
    return load_file(str(out / "student" / "model.safetensors"))


@pytest.fixture(scope="module")
def straight(files):
    subprocess.run(command(files, files / "straight"), check=True, env=ENV, capture_output=True, timeout=300)
    return student(files / "straight")


def logged_steps(out) -> int:
    path = out / "metrics.jsonl"
    return path.read_text().count("\n") if path.exists() else 0


def kill_at_random(files, out, seed) -> dict:
    """Start a run, wait until it has logged a seeded step (in the first half, so the end is far), SIGKILL it a
    seeded moment later: within 5 ms (inside the checkpoint write that follows the log line, on the machines seen)
    or 5-50 ms (anywhere in the next steps); what the kill interrupted. Counting steps, not seconds, keeps the kill
    before the end however fast the machine."""
    pick = random.Random(seed)
    target = pick.randint(1, STEPS // 2)
    delay = pick.uniform(0.0, 0.005) if pick.random() < 0.5 else pick.uniform(0.005, 0.05)
    run = subprocess.Popen(command(files, out), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while logged_steps(out) < target and time.monotonic() < deadline and run.poll() is None:
        time.sleep(0.001)
    time.sleep(delay)
    os.kill(run.pid, signal.SIGKILL)
    run.wait(timeout=60)
    root = out / "checkpoints"
    return {"target_step": target, "finished": (out / "student").is_dir(),
            "inside_a_write": any(p.name.startswith(".tmp") for p in root.iterdir()) if root.is_dir() else False,
            "checkpoints": sorted(p.name for p in root.glob("step-*")) if root.is_dir() else []}


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_killed_at_random_and_resumed_equals_the_uninterrupted_run(seed, files, straight, tmp_path):
    out = tmp_path / "run"
    landed = kill_at_random(files, out, seed)
    assert not landed["finished"], "the kill came after the run ended: nothing was tested"
    resumed = subprocess.run(command(files, out, resume=bool(landed["checkpoints"])), env=ENV,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "taking over the stale lock" in resumed.stdout  # the killed run's lock
    got = student(out)
    assert all(torch.equal(straight[k], got[k]) for k in straight), landed
