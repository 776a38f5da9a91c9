"""Atomic checkpoints and exact resume.

A checkpoint is a folder ``RUN/checkpoints/step-NNNNNNN`` holding
- ``student/``: the student as a plain Hugging Face model (usable on its own, e.g. with ``alambic eval-lm``);
- ``objective-extra.safetensors``: trainable parameters that are not the student's (projections of later recipes);
- ``trainer-state.pt``: optimiser, scheduler, step and every RNG state of every process, so a resumed run (on the
  same number of processes) continues bit for bit.
It is written to a temporary folder and renamed into place, then ``checkpoints/latest`` is rewritten atomically:
an interrupted save leaves the previous checkpoint as the latest.
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from alambic.cache import atomic_directory, atomic_write_text
from alambic.errors import AlambicError

LATEST = "latest"


def rng_state() -> dict:
    """This process's RNG states (Python, NumPy, torch CPU and CUDA)."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _extra_parameters(objective: torch.nn.Module, student: torch.nn.Module) -> dict[str, torch.Tensor]:
    student_ids = {id(p) for p in student.parameters()}
    return {
        name: p.detach().contiguous().cpu()
        for name, p in objective.named_parameters()
        if id(p) not in student_ids
    }


def save_model_folder(model, tokenizer, path: Path) -> None:
    """A plain Hugging Face folder (weights, config and, when given, tokenizer), replaced atomically."""
    with atomic_directory(Path(path)) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)


def save_checkpoint(run_dir: Path, step: int, objective, student, optimizer, scheduler, tokenizer, keep: int,
                    loop_state: dict | None = None, rng_states: list[dict] | None = None) -> Path:
    """Write checkpoint ``step`` atomically, point ``latest`` at it, and prune all but the ``keep`` newest.
    ``loop_state`` is whatever else the loop must restore (e.g. the best evaluation so far); ``rng_states`` holds
    every process's :func:`rng_state` in process order (default: this process's only)."""
    root = Path(run_dir) / "checkpoints"
    final = root / f"step-{step:07d}"
    with atomic_directory(final) as tmp:
        student.save_pretrained(tmp / "student")
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp / "student")
        save_file(_extra_parameters(objective, student), str(tmp / "objective-extra.safetensors"))
        torch.save(
            {"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng_states or [rng_state()],
             "loop": loop_state or {}},
            tmp / "trainer-state.pt",
        )
    atomic_write_text(root / LATEST, final.name)
    for old in sorted(p for p in root.glob("step-*") if p.is_dir())[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(run_dir: Path) -> Path | None:
    pointer = Path(run_dir) / "checkpoints" / LATEST
    if not pointer.is_file():
        return None
    path = pointer.parent / pointer.read_text(encoding="utf-8").strip()
    return path if path.is_dir() else None


def load_checkpoint(path: Path, objective, student, optimizer, scheduler, process_index: int = 0) -> tuple[int, dict]:
    """Restore everything :func:`save_checkpoint` wrote, with process ``process_index``'s RNG states; returns the
    step to continue from and the loop state."""
    path = Path(path)
    trained = type(student).from_pretrained(path / "student", dtype=next(student.parameters()).dtype)
    student.load_state_dict(trained.state_dict())
    extra = load_file(str(path / "objective-extra.safetensors"))
    if extra:
        missing = set(extra) - {name for name, _ in objective.named_parameters()}
        if missing:
            raise AlambicError(f"checkpoint {path} holds parameters this recipe does not have ({sorted(missing)[:3]}): resume with the recipe that wrote it")
        objective.load_state_dict(extra, strict=False)
    state = torch.load(path / "trainer-state.pt", map_location="cpu", weights_only=False)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    rng_states = state["rng"]
    _set_rng_state(rng_states[process_index % len(rng_states)])
    return int(state["step"]), state.get("loop", {})
