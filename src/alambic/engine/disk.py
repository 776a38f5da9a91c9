"""Disk space of a run: what a checkpoint takes, said once, and a refusal, in one line, to start or to save when the
run's device would fill up.

A checkpoint holds the student's fp32 weights and AdamW's two moments (about 12 bytes per trainable parameter: 0.9 GB
for SmolLM2's 15-layer student), and a run keeps ``training.keep_checkpoints`` of them plus its best model. A save
that fills the disk fails half-way; the checks here stop before it, while every earlier checkpoint is intact.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

ADAM_COPIES = 3
"""fp32 weights, exp_avg and exp_avg_sq per trainable parameter."""


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def free_bytes(path: Path) -> int:
    return shutil.disk_usage(path).free


def estimated_checkpoint_bytes(module: torch.nn.Module) -> int:
    """A checkpoint's size before the first one exists: weights and optimiser moments of the trainable parameters."""
    return ADAM_COPIES * sum(p.numel() * 4 for p in module.parameters() if p.requires_grad)


def _gb(size: float) -> str:
    return f"{size / 1e9:.2f} GB" if size >= 1e8 else f"{size / 1e6:.1f} MB"


class DiskGuard:
    """Checks the run folder's device before training and before each save; reports the first checkpoint's size."""

    def __init__(self, run_dir: Path, estimate: int, margin_mb: int, keep: int):
        self.run_dir, self.checkpoint, self.margin, self.keep = Path(run_dir), estimate, margin_mb * 2**20, keep
        self.reported = False

    def problem(self, saving: str) -> str | None:
        """One line when writing one more checkpoint would leave less than the margin free, else None."""
        free = free_bytes(self.run_dir)
        if free >= self.checkpoint + self.margin:
            return None
        return (f"not {saving}: {_gb(free)} free on the device of {self.run_dir}, and a checkpoint takes "
                f"{_gb(self.checkpoint)} plus the {_gb(self.margin)} kept free (training.min_free_disk_mb): free "
                "some space, lower training.keep_checkpoints or training.min_free_disk_mb, or choose another --out"
                " (earlier checkpoints, if any, are intact: rerun with --resume)")

    def saved(self, path: Path) -> str | None:
        """The first save's line: its size, what the run keeps, the space left."""
        self.checkpoint = folder_bytes(path)
        if self.reported:
            return None
        self.reported = True
        return (f"checkpoint {path.name}: {_gb(self.checkpoint)}; the run keeps the last {self.keep} and its best "
                f"model, with {_gb(free_bytes(self.run_dir))} left on the device")

