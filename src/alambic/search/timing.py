"""Timing candidate shapes against their teacher on this machine, and remembering the timings.

A candidate is a model of the teacher's class with random weights (a dense forward costs the same whatever the
values), timed interleaved with the teacher itself (:func:`alambic.evaluation.speed.time_interleaved`), so its
speed-up is a paired median with an interval. Timings are cached per machine (CPU, cores, threads, GPU, torch),
teacher architecture and conditions, in ``$ALAMBIC_CACHE/shape-timings/`` (default ``~/.cache/alambic``): a second
search of the same teacher on the same machine times nothing, and makes the same choice.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from alambic.cache import atomic_write_text, cache_dir
from alambic.evaluation import speed
from alambic.search.budget import Budget
from alambic.search.shapes import Shape

CACHE_VERSION = 1


def machine_key(budget: Budget) -> dict:
    """What a timing depends on besides the shapes: the machine, the library, the conditions."""
    info = speed.machine_info()
    return {"cpu": info["cpu"], "cores": info["cpu_affinity"], "threads": budget.threads or info["torch_threads"],
            "gpu": info["gpu"] if budget.device == "cuda" else None, "torch": info["torch"],
            "transformers": info["transformers"], "device": budget.device,
            "precision": str(budget.dtype).removeprefix("torch."), "batch_size": budget.batch_size,
            "seq_len": budget.seq_len}


class TimingCache:
    """``{shape key: timing}`` of one teacher architecture on one machine, read from and written to one JSON file
    (atomically, after each new timing, so an interrupted search keeps what it measured)."""

    def __init__(self, folder: Path | str | None, machine: dict, teacher_config: dict):
        identity = json.dumps({"version": CACHE_VERSION, "machine": machine, "teacher": teacher_config},
                              sort_keys=True)
        digest = hashlib.sha256(identity.encode()).hexdigest()[:16]
        root = Path(folder) if folder is not None else cache_dir("shape-timings")
        root.mkdir(parents=True, exist_ok=True)
        self.path = root / f"{digest}.json"
        self.machine = machine
        self.entries: dict[str, dict] = {}
        if self.path.is_file():
            try:
                saved = json.loads(self.path.read_text(encoding="utf-8"))
                if saved.get("version") == CACHE_VERSION:
                    self.entries = saved.get("timings", {})
            except (OSError, ValueError):
                self.entries = {}  # a damaged cache only costs a new measurement

    def get(self, shape: Shape) -> dict | None:
        return self.entries.get(shape.key)

    def put(self, shape: Shape, timing: dict) -> None:
        self.entries[shape.key] = timing
        atomic_write_text(self.path, json.dumps({"version": CACHE_VERSION, "machine": self.machine,
                                                 "timings": self.entries}, indent=1, sort_keys=True))


def timing_cache(teacher: torch.nn.Module, budget: Budget, folder: Path | str | None = None) -> TimingCache:
    """The cache of ``teacher``'s architecture (class, type, shape, vocabulary) on this machine in ``budget``'s
    conditions."""
    from alambic import modeling
    from alambic.search.shapes import teacher_shape

    config = teacher.config
    architecture = {"class": type(teacher).__name__, "model_type": config.model_type,
                    "shape": teacher_shape(config).key, "vocab_size": modeling.vocab_size(config)}
    return TimingCache(folder, machine_key(budget), architecture)


def time_against_teacher(teacher: torch.nn.Module, candidate: torch.nn.Module, budget: Budget, *,
                         min_rounds: int = 5, max_rounds: int = 40) -> dict:
    """One candidate timed interleaved with the teacher in the budget's conditions: its latency and its paired
    speed-up with the interval of :func:`alambic.evaluation.speed.paired_speedup`."""
    rows = speed.time_interleaved({"teacher": teacher, "candidate": candidate}, batch_size=budget.batch_size,
                                  seq_len=budget.seq_len, warmup=2, min_rounds=min_rounds, max_rounds=max_rounds)
    paired = rows["candidate"]["paired"]
    return {"latency_ms": rows["candidate"]["ms_per_batch"], "teacher_ms": rows["teacher"]["ms_per_batch"],
            "speedup": paired["speedup"], "notch": paired["notch"], "rounds": paired["rounds"]}
