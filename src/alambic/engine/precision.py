"""Which precision a run computes in: ``training.mixed_precision=auto`` uses bf16 wherever the hardware multiplies
bf16 matrices natively and that is faster here, fp32 elsewhere.

- GPU: bf16 when the device supports it (Ampere and later), else fp32.
- CPU: bf16 only with native bf16 matrix instructions (AMX-BF16 tiles or AVX512-BF16) *and* when a quick in-process
  check (a few 1024^3 matmuls, well under a second) shows bf16 at least ``MIN_SPEEDUP`` times faster than fp32. On a
  CPU without them bf16 is emulated and slower than fp32, so it stays fp32.

``bf16`` (what ``auto`` picks) computes the student in bf16 and keeps fp32 master weights in the optimiser
(:mod:`alambic.engine.master_weights`); under FSDP2 the sharding's own mixed-precision policy does the same.
``bf16-autocast`` keeps fp32 parameters and lets autocast cast each matmul's inputs and weights to bf16 on every call,
the scheme torch and accelerate default to (slower on a CPU: the casts cost up to a fifth of a step). In both the
frozen teacher is cast to bf16 (inference only), and the losses keep their softmax math in fp32.

``ALAMBIC_CPU_BF16=0`` (or ``1``; any on/off word, :mod:`alambic.environment`) makes the CPU count as lacking (or having) native bf16 instructions: it simulates
another machine in tests and lets a user rule bf16 out without editing configs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch

from alambic.environment import env_switch

MIN_SPEEDUP = 1.3
"""bf16 must beat fp32 by this factor in the quick check before ``auto`` picks it on a CPU."""


@dataclass(frozen=True)
class PrecisionChoice:
    precision: str
    """``bf16`` (bf16 compute, fp32 master weights), ``bf16-autocast``, ``fp16`` or ``no`` (fp32)."""
    reason: str
    """Why, in a few words, for the log and the model card."""

    @property
    def bf16(self) -> bool:
        return self.precision in ("bf16", "bf16-autocast")

    def master_weights(self, fsdp: bool) -> bool:
        """Whether the loop keeps fp32 masters of a bf16 student (FSDP2's policy does it for sharded runs)."""
        return self.precision == "bf16" and not fsdp

    def accelerate(self, fsdp: bool) -> str:
        """What accelerate is given: it autocasts under ``bf16`` and ``fp16``; a bf16 student with masters needs
        none."""
        if self.master_weights(fsdp):
            return "no"
        return "bf16" if self.bf16 else self.precision

    def describe(self) -> str:
        name = {"no": "fp32", "bf16": "bf16 with fp32 master weights"}.get(self.precision, self.precision)
        return f"{name} ({self.reason})"


def cpu_bf16_instructions() -> str | None:
    """The CPU's native bf16 matrix instructions (``AMX-BF16``, ``AVX512-BF16``), or None; ``ALAMBIC_CPU_BF16``
    overrides what the CPU reports."""
    forced = env_switch("ALAMBIC_CPU_BF16")
    if forced is not None:
        return "AMX-BF16 (ALAMBIC_CPU_BF16=1)" if forced else None
    features = getattr(torch, "cpu", None)
    try:
        if features._is_amx_tile_supported():
            return "AMX-BF16"
        if features._is_avx512_bf16_supported():
            return "AVX512-BF16"
        return None
    except AttributeError:  # a torch without the probes: read the flags the kernel reports
        pass
    try:
        flags = next((line.split(":", 1)[1].split() for line in open("/proc/cpuinfo") if line.startswith("flags")), [])
    except OSError:
        return None
    if "amx_bf16" in flags:
        return "AMX-BF16"
    return "AVX512-BF16" if "avx512_bf16" in flags else None


def matmul_flops(size: int, dtype: torch.dtype, repeats: int = 3, device: str = "cpu") -> float:
    """FLOP/s of a dense ``size``^3 matmul in ``dtype`` on ``device``, best of ``repeats`` after a warm-up."""
    a, b = (torch.randn(size, size, dtype=dtype, device=device) for _ in range(2))
    a @ b  # warm-up: the first call packs weights and spins up threads
    best = float("inf")
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def bf16_matmul_speedup(size: int = 1024, repeats: int = 3) -> float:
    """How many times faster a ``size``^3 matmul runs in bf16 than in fp32 on this CPU."""
    return matmul_flops(size, torch.bfloat16, repeats) / matmul_flops(size, torch.float32, repeats)


@dataclass(frozen=True)
class Hardware:
    """What the precision choice depends on; :meth:`detect` reads this machine, tests describe others."""

    cuda: bool
    cuda_bf16: bool
    cpu_bf16: str | None
    """The CPU's native bf16 matrix instructions, see :func:`cpu_bf16_instructions`."""

    @classmethod
    def detect(cls) -> "Hardware":
        cuda = torch.cuda.is_available()
        return cls(cuda=cuda, cuda_bf16=cuda and torch.cuda.is_bf16_supported(),
                   cpu_bf16=None if cuda else cpu_bf16_instructions())


def choose_precision(requested: str, hardware: Hardware | None = None,
                     speedup: Callable[[], float] | None = None) -> PrecisionChoice:
    """Resolve ``training.mixed_precision`` (auto, bf16, bf16-autocast, fp16, no) for ``hardware`` (this machine by
    default); ``speedup`` is the quick bf16-vs-fp32 check (:func:`bf16_matmul_speedup` by default), run only on a CPU
    with native bf16 instructions."""
    if requested != "auto":
        return PrecisionChoice(requested, "as configured")
    hardware = hardware or Hardware.detect()
    if hardware.cuda:
        if hardware.cuda_bf16:
            return PrecisionChoice("bf16", "auto: GPU with bf16")
        return PrecisionChoice("no", "auto: this GPU has no bf16")
    if hardware.cpu_bf16 is None:
        return PrecisionChoice("no", "auto: this CPU has no native bf16 matrix instructions")
    ratio = (speedup or bf16_matmul_speedup)()
    if ratio < MIN_SPEEDUP:
        return PrecisionChoice("no", f"auto: CPU with {hardware.cpu_bf16}, but bf16 matmuls ran only {ratio:.1f}x "
                                     "as fast as fp32 in a quick check")
    return PrecisionChoice("bf16", f"auto: CPU with {hardware.cpu_bf16}, bf16 matmuls {ratio:.1f}x as fast as fp32 "
                                   "in a quick check")
