"""Giving freed memory back to the operating system between stages."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc


@functools.cache
def _malloc_trim() -> ctypes._NamedFuncPointer | None:
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):  # not glibc: nothing to trim
        return None


def release_freed_memory(collect: bool = False) -> None:
    """Return the heap's free pages to the OS (glibc's malloc_trim); `collect`: first collect
    cyclic garbage (a full collection of a large process takes a while).

    glibc keeps what a stage freed for later allocations, so the process's RSS stays at the
    stage's peak; at 100,000 examples the teacher stages leave hundreds of MiB freed but held
    while the Great Expectations worker takes its own share (bench item 5).
    """
    if collect:
        gc.collect()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
