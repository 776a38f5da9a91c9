"""Teacher logits computed once: the first time a training feature is seen, its teacher rows are stored, and every
later epoch, stage or student distilled from the same teacher on the same features reads them instead of running
the teacher again.

The key is (teacher weights, task, token ids of every feature), so a changed teacher, tokenisation or data file
never reads stale logits. The file lives under ``$ALAMBIC_CACHE/teacher-logits`` and is rewritten atomically when
new rows were added (every ``flush_every`` new features and at the end of a stage).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import torch

from alambic.cache import cache_dir


def teacher_fingerprint(path: Path) -> str:
    """Folder, size and modification time of every weight file: changes when the teacher is re-trained."""
    parts = [str(Path(path).resolve())]
    for file in sorted(Path(path).glob("*.safetensors")) + sorted(Path(path).glob("*.bin")):
        stat = file.stat()
        parts.append(f"{file.name}:{stat.st_size}:{stat.st_mtime_ns}")
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def split_rows(task: str, rows: torch.Tensor, batch: dict) -> list[torch.Tensor]:
    """Per-feature pieces of a batch's prediction rows (the inverse of :func:`join_rows`)."""
    rows = rows.detach().float().cpu()
    if task == "classification":
        return list(rows)
    if task == "ner":
        return list(rows.split(batch["label_counts"].tolist()))
    lengths = batch["attention_mask"].sum(dim=1).tolist()
    starts, ends = rows.view(2, len(lengths), -1).unbind(0)
    return [torch.stack([s[:n], e[:n]]) for s, e, n in zip(starts, ends, lengths)]


def join_rows(task: str, pieces: list[torch.Tensor], batch: dict) -> torch.Tensor:
    if task == "classification":
        return torch.stack(pieces)
    if task == "ner":
        return torch.cat(pieces) if pieces else torch.zeros(0)
    length = batch["input_ids"].shape[1]
    out = torch.zeros(2, len(pieces), length)
    for b, piece in enumerate(pieces):
        out[:, b, :piece.shape[1]] = piece
    return out.flatten(0, 1)


class TeacherLogitCache:
    """``{feature index: teacher rows}`` for one (teacher, task, features) key, kept in memory and on disk."""

    def __init__(self, task: str, key: str, *, folder: Path | None = None, flush_every: int = 2048):
        self.task = task
        self.path = (Path(folder) if folder else cache_dir("teacher-logits")) / f"{key}.pt"
        self.flush_every = flush_every
        self.rows: dict[int, torch.Tensor] = {}
        if self.path.is_file():
            self.rows = torch.load(self.path, map_location="cpu", weights_only=True)
        self.stored = len(self.rows)
        self.hits = self.misses = 0

    def get(self, batch: dict, device) -> torch.Tensor | None:
        ids = batch["feature_ids"].tolist()
        if not all(i in self.rows for i in ids):
            self.misses += 1
            return None
        self.hits += 1
        return join_rows(self.task, [self.rows[i] for i in ids], batch).to(device)

    def put(self, batch: dict, rows: torch.Tensor) -> None:
        for i, piece in zip(batch["feature_ids"].tolist(), split_rows(self.task, rows, batch)):
            self.rows[i] = piece.clone()
        if len(self.rows) - self.stored >= self.flush_every:
            self.flush()

    def flush(self) -> None:
        if len(self.rows) == self.stored:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".tmp-{self.path.name}-", dir=self.path.parent)
        os.close(fd)
        try:
            torch.save(self.rows, tmp)
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        self.stored = len(self.rows)
