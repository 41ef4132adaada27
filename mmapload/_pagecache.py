"""Which of a shard's pages the page cache held before this load read them (header.py asks when it
opens a shard for its header, before reading anything; the readers use that answer).

``drop_page_cache`` drops from the page cache what a load read in, so that a cold load does not
grow it by the model; pages that were cached before the load stay, so a warm checkpoint stays warm
(dropping them cost the next load a disk read and this one the eviction: 0.5-0.7 s of a 4 GiB warm
CPU load here). ``Cached.of(fd, size)`` asks once, when the shard is opened: ``cachestat(2)`` (Linux
6.5) counts the cached pages of the whole file in one call (7 ms for 2 GB here); a file that is partly
cached is counted again per 64 MiB window, and only a window that is partly cached is asked page by
page, with ``mincore(2)`` on a map that touches nothing (mincore alone: 45 ms for 2 GB). Neither tells of a file we neither own nor may write (the kernel's can_do_mincore:
cachestat fails with EPERM and mincore answers "all resident"), nor on another OS: then nothing counts
as cached, and everything read is dropped, as without the snapshot.
"""

from __future__ import annotations

import ctypes
import mmap
import os

import numpy as np

from ._libc import function

__all__ = ["Cached", "PAGE", "count_cached", "cached_bytes", "trusted"]

PAGE = mmap.PAGESIZE
_SYS_CACHESTAT = 451   # the same number on every architecture (syscalls added since 5.x share one table)
_WINDOW_PAGES = 1 << 14   # 64 MiB of 4 KiB pages per count of a partly cached file


class _Range(ctypes.Structure):
    _fields_ = [("off", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class _Stat(ctypes.Structure):
    _fields_ = [(n, ctypes.c_uint64) for n in ("nr_cache", "nr_dirty", "nr_writeback", "nr_evicted",
                                                 "nr_recently_evicted")]


_syscall = function("syscall", (ctypes.c_long, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint),
                    ctypes.c_long)
_mincore = function("mincore", (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p))


def count_cached(fd: int, lo: int = 0, length: int = 0) -> int | None:
    """Pages of file bytes [lo, lo + length) (length 0: to the end) in the page cache now
    (cachestat), None where the kernel lacks it."""
    if _syscall is None:
        return None
    st = _Stat()
    if _syscall(_SYS_CACHESTAT, fd, ctypes.byref(_Range(lo, length)), ctypes.byref(st), 0) != 0:
        return None
    return int(st.nr_cache)


def trusted(fd: int) -> bool:
    """Whether the kernel tells us the page-cache state of this file: we own it or may write it
    (as its can_do_mincore / can_do_cachestat decide; a read-only mount is not writable)."""
    try:
        if os.fstat(fd).st_uid == os.geteuid():
            return True
        return os.access(f"/proc/self/fd/{fd}", os.W_OK, effective_ids=os.access in os.supports_effective_ids)
    except OSError:
        return False


def cached_bytes(fd: int, size: int) -> int | None:
    """Bytes of the file (``size`` bytes) in the page cache now; None where the kernel will not
    tell (``trusted``) or cannot (another OS)."""
    n = count_cached(fd)
    if n is not None or size == 0:
        return min((n or 0) * PAGE, size)
    pages = _per_page(fd, size) if trusted(fd) else None
    return None if pages is None else min(int(pages.sum()) * PAGE, size)


def _per_page(fd: int, size: int, counted: bool = False) -> np.ndarray | None:
    """One bool per page: in the page cache now. ``counted``: cachestat answers, so windows it
    finds wholly cached or wholly uncached are not asked page by page."""
    if _mincore is None or size == 0:
        return None
    try:
        mm = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
    except (OSError, ValueError):
        return None
    n_pages = -(-size // PAGE)
    pages = np.zeros(n_pages, dtype=bool)
    vec = np.zeros(min(n_pages, _WINDOW_PAGES), dtype=np.uint8)
    arr = np.frombuffer(mm, dtype=np.uint8)   # only for the map's address; never read
    try:
        addr = arr.ctypes.data
        for p0 in range(0, n_pages, _WINDOW_PAGES):
            n = min(_WINDOW_PAGES, n_pages - p0)
            length = min(n * PAGE, size - p0 * PAGE)
            have = count_cached(fd, p0 * PAGE, length) if counted else None
            if have == 0:
                continue
            if have is not None and have >= n:
                pages[p0:p0 + n] = True
            elif _mincore(addr + p0 * PAGE, length, vec.ctypes.data) == 0:
                pages[p0:p0 + n] = vec[:n] & 1
            else:
                return None
    finally:
        del arr   # the buffer export first: a map with a live export cannot close
        mm.close()
    return pages


class Cached:
    """The page-cache residency of one file when it was opened; ``read_in(lo, hi)`` says which
    parts of [lo, hi) were not cached then (what this load brought in and may drop)."""

    def __init__(self, pages: bool | np.ndarray):
        self._pages = pages   # True: all cached, False: none, else one bool per page

    @classmethod
    def of(cls, fd: int, size: int) -> "Cached":
        n_pages = -(-size // PAGE)
        n = count_cached(fd)
        if n is not None and n >= n_pages:
            return cls(True)
        if n == 0 or n_pages == 0 or (n is None and not trusted(fd)):
            return cls(False)
        pages = _per_page(fd, size, counted=n is not None)
        return cls(False if pages is None else pages)

    def read_in(self, lo: int, hi: int) -> list[tuple[int, int]]:
        """The page-aligned ranges inside [lo, hi) (page-aligned bounds) that were not cached."""
        if hi <= lo or self._pages is True:
            return []
        if self._pages is False:
            return [(lo, hi)]
        was = self._pages[lo // PAGE:-(-hi // PAGE)]
        if was.all():
            return []
        if not was.any():
            return [(lo, hi)]
        # edges of the runs of uncached pages: True -> False starts one, False -> True ends it
        edges = np.flatnonzero(np.diff(np.concatenate(([True], was, [True])).astype(np.int8)))
        return [(lo + int(a) * PAGE, min(hi, lo + int(b) * PAGE)) for a, b in edges.reshape(-1, 2)]
