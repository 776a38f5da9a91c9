"""Keep freed host memory for reuse, so a CPU training step does not fault its large buffers back in every step.

glibc serves every block above its mmap threshold (32 MB at most) with a fresh ``mmap`` and returns it to the system on
``free``. A distillation step allocates several such blocks each step (the vocabulary loss's chunk buffers, the V x d
weight gradient and its copies), so each step first touches hundreds of MB of new pages: about 60,000 page faults
per step on the BERT-base-shape setup, a fifth of a bf16 step on an AMX Xeon (docs/benchmarks.md). Taken from the
heap instead, and the heap never trimmed, the blocks are reused with their pages already mapped.

The price: the process keeps the memory of its peak (which a training run reaches every step anyway) instead of
returning freed blocks. ``ALAMBIC_KEEP_FREED_MEMORY=0`` leaves the allocator as it was. Other C libraries (musl,
macOS) are left alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

from alambic.environment import env_switch

# mallopt parameters (glibc malloc.h)
_M_TRIM_THRESHOLD = -1  # free memory at the top of the heap kept up to this many bytes
_M_TOP_PAD = -2  # extra bytes requested from the system each time the heap grows
_M_MMAP_MAX = -4  # how many blocks may be mmapped at once: 0 serves every block from the heap
_INT_MAX = 2**31 - 1
_TOP_PAD = 2**30  # address space only: pages are mapped when first touched


@functools.cache
def keep_freed_memory() -> bool:
    """Make glibc serve large blocks from the heap and keep freed ones; True when applied (once per process)."""
    if env_switch("ALAMBIC_KEEP_FREED_MEMORY") is False:
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return False
    if not hasattr(libc, "gnu_get_libc_version"):  # not glibc: its mallopt options mean nothing there
        return False
    return all(libc.mallopt(option, value) == 1 for option, value in
               ((_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _INT_MAX), (_M_TOP_PAD, _TOP_PAD)))
