"""Atomic checkpoints and exact resume.

A checkpoint is a folder ``RUN/checkpoints/step-NNNNNNN`` holding
- ``student/``: the student as a plain Hugging Face model (usable on its own, e.g. with ``alambic eval-lm``);
- ``objective-extra.safetensors``: trainable parameters that are not the student's (projections of later recipes);
- ``trainer-state.pt``: optimiser, scheduler, step and every RNG state of every process, so a resumed run (on the
  same number of processes) continues bit for bit. Only tensors and plain values (no pickled objects): it loads
  with ``torch.load(weights_only=True)``, so a checkpoint folder from someone else cannot run code;
- ``manifest.json``, written last: the step and every file's size, so a truncated or incomplete checkpoint is
  recognised without loading it.
It is written to a temporary folder and renamed into place, then ``checkpoints/latest`` is rewritten atomically:
an interrupted save leaves the previous checkpoint as the latest. Older checkpoints are pruned only once the new one
verifies, so the last good one is never deleted; ``--resume`` takes the newest checkpoint that verifies and loads,
and says which ones it skipped and why.
"""

from __future__ import annotations

import json
import pickle
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from alambic.cache import atomic_directory, atomic_write_text
from alambic.environment import env_switch
from alambic.errors import AlambicError

LATEST = "latest"
MANIFEST = "manifest.json"
FORMAT = 2
TRUST_ENV = "ALAMBIC_TRUST_CHECKPOINTS"
"""Set to 1 to load a trainer state that needs pickle (checkpoints of alambic before format 2), trusting its author."""
_LOAD_ERRORS = (OSError, RuntimeError, ValueError, KeyError, EOFError, SafetensorError, pickle.UnpicklingError,
                json.JSONDecodeError)


class UnusableCheckpoint(AlambicError):
    pass


def rng_state() -> dict:
    """This process's RNG states (Python, NumPy, torch CPU and CUDA), as tensors and plain values."""
    name, keys, position, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "position": int(position),
                       "has_gauss": int(has_gauss), "gauss": float(gauss)}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    numpy_state = state["numpy"]
    if isinstance(numpy_state, dict):
        numpy_state = (numpy_state["name"], numpy_state["keys"].numpy().astype(np.uint32), numpy_state["position"],
                       numpy_state["has_gauss"], numpy_state["gauss"])
    np.random.set_state(numpy_state)
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


def checkpoint_path(run_dir: Path, step: int) -> Path:
    """Where checkpoint ``step`` of a run lives: ``OUT/checkpoints/step-NNNNNNN``."""
    return Path(run_dir) / "checkpoints" / f"step-{step:07d}"


def save_checkpoint(run_dir: Path, step: int, objective, student, optimizer, scheduler, tokenizer, keep: int,
                    loop_state: dict | None = None, rng_states: list[dict] | None = None) -> Path:
    """Write checkpoint ``step`` atomically, point ``latest`` at it, and prune all but the ``keep`` newest.
    ``loop_state`` is whatever else the loop must restore (e.g. the best evaluation so far); ``rng_states`` holds
    every process's :func:`rng_state` in process order (default: this process's only)."""
    final = checkpoint_path(run_dir, step)
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
        write_manifest(tmp, step)
    publish_checkpoint(run_dir, final, keep)
    return final


def write_manifest(folder: Path, step: int, **extra) -> None:
    """``manifest.json``, written last: the step and every file's size (what :func:`verify_checkpoint` checks)."""
    files = {str(f.relative_to(folder)): f.stat().st_size for f in sorted(folder.rglob("*")) if f.is_file()}
    (folder / MANIFEST).write_text(json.dumps({"format": FORMAT, "step": step, **extra, "files": files}, indent=1))


def publish_checkpoint(run_dir: Path, final: Path, keep: int) -> None:
    """Once ``final`` is in place: verify it, point ``latest`` at it, and only then prune all but the ``keep``
    newest (a checkpoint that does not verify leaves every older one)."""
    problem = verify_checkpoint(final)
    if problem is not None:  # e.g. a disk that filled up unnoticed: keep every older checkpoint
        raise UnusableCheckpoint(f"checkpoint {final} did not verify after writing ({problem}); the older "
                                 "checkpoints are kept: free disk space and rerun with --resume")
    atomic_write_text(Path(run_dir) / "checkpoints" / LATEST, final.name)
    for old in checkpoints(run_dir)[keep:]:
        shutil.rmtree(old, ignore_errors=True)


def checkpoints(run_dir: Path) -> list[Path]:
    """The run's checkpoint folders, newest first."""
    root = Path(run_dir) / "checkpoints"
    return sorted((p for p in root.glob("step-*") if p.is_dir()), key=lambda p: p.name, reverse=True)


def finished_step(run_dir: Path, max_steps: int) -> int | None:
    """The step of the run's latest checkpoint when it has reached ``max_steps`` (nothing left to train), else None."""
    latest = latest_checkpoint(run_dir)
    if latest is None:
        return None
    try:
        step = int(json.loads((latest / MANIFEST).read_text(encoding="utf-8"))["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return step if step >= max_steps else None


def require_checkpoints(run_dir: Path) -> list[Path]:
    """The run's checkpoints, newest first; none is the one-line error ``--resume`` gives (checked up front, before
    a run writes anything)."""
    found = checkpoints(run_dir)
    if not found:
        raise AlambicError(f"--resume: no checkpoint in {Path(run_dir) / 'checkpoints'}; start without --resume")
    return found


def verify_checkpoint(path: Path) -> str | None:
    """None when ``path`` is a complete checkpoint (every file of its manifest present at its size, the weights'
    headers readable, the step matching the folder's name); else what is wrong, in a few words."""
    path = Path(path)
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        needed = ["student/config.json", "objective-extra.safetensors", "trainer-state.pt"]
        missing = [name for name in needed if not (path / name).is_file()]
        return f"{', '.join(missing)} missing" if missing else None  # before format 2: no manifest to compare
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        files, step = dict(manifest["files"]), int(manifest["step"])
    except (OSError, ValueError, KeyError, TypeError) as error:
        return f"{MANIFEST} unreadable ({error})"
    if path.name != checkpoint_path(path.parent, step).name:
        return f"{MANIFEST} says step {step}, the folder is {path.name}"
    for name, size in files.items():
        file = path / name
        if not file.is_file():
            return f"{name} missing"
        if file.stat().st_size != size:
            return f"{name} truncated or changed ({file.stat().st_size:,} bytes, {size:,} written)"
        if name.endswith(".safetensors"):
            try:
                with safe_open(str(file), framework="pt"):
                    pass
            except (SafetensorError, OSError) as error:
                return f"{name} unreadable ({error})"
    return None


def latest_checkpoint(run_dir: Path) -> Path | None:
    pointer = Path(run_dir) / "checkpoints" / LATEST
    if not pointer.is_file():
        return None
    path = pointer.parent / pointer.read_text(encoding="utf-8").strip()
    return path if path.is_dir() else None


def _trainer_state(path: Path) -> dict:
    file = path / "trainer-state.pt"
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        if env_switch(TRUST_ENV):
            return torch.load(file, map_location="cpu", weights_only=False)
        raise AlambicError(
            f"{file} holds pickled objects (an alambic before checkpoint format {FORMAT} wrote them, or someone "
            f"else's code); alambic loads trainer states without pickle, so a checkpoint cannot run code: start "
            f"afresh without --resume, or, if you trust whoever wrote it, rerun with {TRUST_ENV}=1"
        ) from None


def check_world_size(path: Path, saved: int, processes: int) -> None:
    """One line when a run saved by ``saved`` processes is resumed by another number: each process reads its own
    share of the batches, so the data order and the global batch would change, and batches be trained twice."""
    if saved != processes:
        raise AlambicError(f"checkpoint {Path(path).name} was written by a run of {saved} process"
                           f"{'es' if saved != 1 else ''}, and this run has {processes}: resume with the same number "
                           f"(torchrun --nproc_per_node {saved}{', or no launcher' if saved == 1 else ''}), or start "
                           "afresh in another --out")


def resume_checkpoint(run_dir: Path, objective, student, optimizer, scheduler, process_index: int = 0,
                      say=print, load=None) -> tuple[Path, int, dict]:
    """Load the newest checkpoint of ``run_dir`` that verifies and loads (with ``load``, :func:`load_checkpoint`
    by default), saying which newer ones were skipped and why; returns it with the step and loop state. None usable
    is one clear error."""
    load = load or load_checkpoint
    found = require_checkpoints(run_dir)
    problems = []
    for path in found:
        problem = verify_checkpoint(path)
        if problem is None:
            try:
                step, loop_state = load(path, objective, student, optimizer, scheduler, process_index)
            except _LOAD_ERRORS as error:
                problem = f"does not load: {str(error).splitlines()[0] if str(error) else type(error).__name__}"
            else:
                for skipped, why in problems:
                    say(f"checkpoint {skipped.name} is unusable ({why}): skipped")
                return path, step, loop_state
        problems.append((path, problem))
    newest, why = problems[0]
    raise AlambicError(f"--resume: none of the {len(found)} checkpoints in {Path(run_dir) / 'checkpoints'} is usable "
                       f"(newest, {newest.name}: {why}); start again without --resume")


def load_checkpoint(path: Path, objective, student, optimizer, scheduler, process_index: int = 0,
                    processes: int | None = None) -> tuple[int, dict]:
    """Restore everything :func:`save_checkpoint` wrote, with process ``process_index``'s RNG states; returns the
    step to continue from and the loop state. ``processes``: the resuming run's process count, which must be the
    saving run's (its data order and global batch depend on it)."""
    path = Path(path)
    if (path / "sharded").is_dir():
        raise AlambicError(f"checkpoint {path} was written under FSDP (sharded): resume it with "
                           "training.distributed=fsdp on the same number of processes")
    state = _trainer_state(path)
    if processes is not None:
        check_world_size(path, len(state["rng"]), processes)
    trained = type(student).from_pretrained(path / "student", dtype=next(student.parameters()).dtype)
    student.load_state_dict(trained.state_dict())
    extra = load_file(str(path / "objective-extra.safetensors"))
    if extra:
        missing = set(extra) - {name for name, _ in objective.named_parameters()}
        if missing:
            raise AlambicError(f"checkpoint {path} holds parameters this recipe does not have ({sorted(missing)[:3]}): resume with the recipe that wrote it")
        objective.load_state_dict(extra, strict=False)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    rng_states = state["rng"]
    _set_rng_state(rng_states[process_index % len(rng_states)])
    return int(state["step"]), state.get("loop", {})
