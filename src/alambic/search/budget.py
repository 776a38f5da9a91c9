"""What the user asks of the student instead of a shape: a speed-up, a latency or a size, and the conditions that
define it (batch, sequence length, device, threads, precision; by default those of ``alambic report``'s latency)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from alambic.errors import AlambicError

PRECISIONS = ("float32", "bfloat16")
PROMISE_TOLERANCE = 0.05
"""A budget is kept when the measured speed-up is at least (1 - 5%) of it (or the latency at most 5% above it):
5% is the bound within which one model timed against itself reads 1.00x on the test machine (tests/test_speed.py),
widened to the measured interval when the report's timing is noisier."""


@dataclass
class Budget:
    speedup: float | None = None
    """The student runs at least this many times faster than its teacher (a forward at batch_size x seq_len)."""
    latency_ms: float | None = None
    """A forward of the student at batch_size x seq_len takes at most this many milliseconds."""
    params: int | None = None
    """The student has at most this many parameters (tied weights once)."""
    batch_size: int = 1
    seq_len: int = 128
    device: str = "cpu"
    threads: int | None = None
    """torch CPU threads while timing (None: torch's default, recorded either way)."""
    precision: str | None = None
    """float32 or bfloat16 (None: float32 on CPU, bfloat16 on a GPU, as alambic report times)."""

    def check(self) -> "Budget":
        given = [name for name in ("speedup", "latency_ms", "params") if getattr(self, name) is not None]
        if len(given) > 1:
            raise AlambicError(f"give one budget, not {len(given)}: --target-speedup, --target-latency or "
                               "--target-params")
        if not given:
            raise AlambicError("a shape search needs a budget: --target-speedup X, --target-latency MS or "
                               "--target-params N")
        if self.speedup is not None and self.speedup <= 1:
            raise AlambicError(f"--target-speedup {self.speedup:g}: a student must be faster than its teacher, "
                               "give a speed-up above 1 (e.g. 2 for twice as fast)")
        if self.latency_ms is not None and self.latency_ms <= 0:
            raise AlambicError(f"--target-latency {self.latency_ms:g}: a latency is a positive number of "
                               "milliseconds")
        if self.params is not None and self.params < 1:
            raise AlambicError(f"--target-params {self.params}: give a positive parameter count (e.g. 20e6)")
        for name, value in (("--budget-batch-size", self.batch_size), ("--budget-seq-len", self.seq_len)):
            if value < 1:
                raise AlambicError(f"{name} must be at least 1, got {value}")
        if self.threads is not None and self.threads < 1:
            raise AlambicError(f"--budget-threads must be at least 1, got {self.threads}")
        if self.device not in ("cpu", "cuda"):
            raise AlambicError(f"--budget-device {self.device!r}: use cpu or cuda")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise AlambicError("--budget-device cuda: no GPU is visible to torch on this machine; time on cpu")
        if self.precision is not None and self.precision not in PRECISIONS:
            raise AlambicError(f"--budget-precision {self.precision!r}: use {' or '.join(PRECISIONS)}")
        return self

    @property
    def dtype(self) -> torch.dtype:
        precision = self.precision or ("bfloat16" if self.device == "cuda" else "float32")
        return getattr(torch, precision)

    @property
    def timed(self) -> bool:
        """Whether the budget is a speed (measured) rather than a size (counted)."""
        return self.params is None

    def conditions(self) -> str:
        threads = f", {self.threads} threads" if self.threads else ""
        return (f"batch {self.batch_size} x {self.seq_len} tokens, {self.device} "
                f"{str(self.dtype).removeprefix('torch.')}{threads}")

    def describe(self) -> str:
        if self.speedup is not None:
            return f"{self.speedup:g}x faster than the teacher at {self.conditions()}"
        if self.latency_ms is not None:
            return f"at most {self.latency_ms:g} ms per forward at {self.conditions()}"
        return f"at most {self.params / 1e6:.4g}M parameters"

    def met_by(self, *, speedup: float | None = None, latency_ms: float | None = None, params: int | None = None,
               tolerance: float = 0.0) -> bool:
        """Whether a measured student keeps the budget (``tolerance``: the relative slack granted to noise)."""
        if self.speedup is not None:
            return speedup is not None and speedup >= self.speedup * (1 - tolerance)
        if self.latency_ms is not None:
            return latency_ms is not None and latency_ms <= self.latency_ms * (1 + tolerance)
        return params is not None and params <= self.params

    def to_dict(self) -> dict:
        return {**asdict(self), "precision": str(self.dtype).removeprefix("torch.")}
