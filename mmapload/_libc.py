"""The C library through ctypes, one handle for the few calls Python lacks (sync_file_range,
process_vm_readv) or holds the GIL through (madvise: mmap.madvise keeps it for a whole fault-in).
ctypes releases the GIL during the call and keeps errno (``ctypes.get_errno()``)."""

from __future__ import annotations

import ctypes
import ctypes.util

__all__ = ["function"]

try:
    _LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
except OSError:   # no C library to load (not Linux / glibc-like): the callers fall back
    _LIBC = None


def function(name: str, argtypes: tuple, restype=ctypes.c_int):
    """libc's ``name`` with these argument and result types, or None where it has none."""
    try:
        f = getattr(_LIBC, name) if _LIBC is not None else None
    except AttributeError:
        return None
    if f is not None:
        f.argtypes, f.restype = argtypes, restype
    return f
