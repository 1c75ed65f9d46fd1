"""Flat memory for long runs over many tiles (Linux/glibc only)."""
from __future__ import annotations


def fix_mmap_threshold(threshold: int) -> None:
    """Serve buffers of `threshold` bytes and more straight from and back to the OS.

    glibc raises its mmap threshold each time a large buffer is freed, and then
    serves such buffers from the heap (from each thread's own arena), which
    fragments: peak memory grew with the number of tiles, or with the download
    speed, not with the work in flight. A fixed threshold keeps it flat."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-3, threshold)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):  # not glibc (macOS, Windows, musl): nothing to tune
        pass
