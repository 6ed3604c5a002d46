"""secateurs.recovery.allocator: freed blocks stay in the process (glibc), or nothing changes when disabled."""

import ctypes

import pytest
import torch

from secateurs.recovery import allocator


class MallInfo2(ctypes.Structure):  # glibc >= 2.33, malloc.h
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                     "fsmblks", "uordblks", "fordblks", "keepcost")]


def _mallinfo() -> MallInfo2:
    libc = allocator._glibc()
    libc.mallinfo2.restype = MallInfo2
    return libc.mallinfo2()


@pytest.mark.glibc
def test_freed_tensor_memory_stays_in_the_heap_for_the_next_step():
    """A 64 MiB tensor (glibc would mmap it and give it back on free) comes from the heap and its
    memory is still there, free for reuse, after the tensor is gone."""
    state = allocator.retain_freed_memory()
    assert state == {"retained": True, "mmap_threshold": 1 << 30, "trim_threshold": 1 << 30}
    size = 64 << 20
    mapped_before = _mallinfo().hblkhd
    block = torch.empty(size, dtype=torch.uint8).fill_(1)
    during = _mallinfo()
    assert during.hblkhd == mapped_before  # not a separate mapping
    assert during.uordblks >= size  # in the heap
    del block
    assert _mallinfo().fordblks >= size  # kept, not returned to the kernel
    assert allocator.retain_freed_memory() == state  # once per process


def test_disabled_by_the_environment_leaves_glibc_alone(monkeypatch):
    monkeypatch.setattr(allocator, "_STATE", {})
    monkeypatch.setenv(allocator.DISABLE_VARIABLE, "0")
    monkeypatch.setattr(allocator, "_glibc", lambda: (_ for _ in ()).throw(AssertionError("glibc touched")))
    assert allocator.retain_freed_memory() == {"retained": False, "why": "SECATEURS_KEEP_FREED_MEMORY=0"}
