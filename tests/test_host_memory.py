"""Freed host memory kept for reuse (alambic.engine.host_memory): large blocks come from glibc's heap and stay there."""

import ctypes
import ctypes.util

import pytest
import torch

from alambic.engine.host_memory import keep_freed_memory


class MallocInfo(ctypes.Structure):  # glibc's struct mallinfo2
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def malloc_info() -> MallocInfo:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallinfo2 = libc.mallinfo2
    except (OSError, AttributeError):
        pytest.skip("needs glibc 2.33 or later (mallinfo2)")
    mallinfo2.restype = MallocInfo
    return mallinfo2()


def test_a_large_block_comes_from_the_heap_and_stays_there_once_freed():
    malloc_info()  # skips on other C libraries
    assert keep_freed_memory()
    before = malloc_info()
    block = torch.ones(16 * 2**20)  # 64 MB: above glibc's largest mmap threshold (32 MB), so mmapped by default
    alive = malloc_info()
    del block
    freed = malloc_info()
    assert alive.hblkhd == before.hblkhd  # not mmapped (by default: +64 MB here, and unmapped again on free)
    assert freed.fordblks >= 64 * 2**20  # kept in the heap, pages mapped, for the next step's blocks


def test_the_switch_leaves_the_allocator_alone(monkeypatch):
    monkeypatch.setenv("ALAMBIC_KEEP_FREED_MEMORY", "0")
    keep_freed_memory.cache_clear()
    try:
        assert keep_freed_memory() is False
    finally:
        keep_freed_memory.cache_clear()
