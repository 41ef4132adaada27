"""``DirectShard`` (``io="direct"``): ``O_DIRECT`` reads that bypass the page cache, so the
cache does not grow at all. O_DIRECT wants the file offset, the length and the buffer
address aligned to the device's logical block; reads go through a page-aligned bounce
buffer covering the aligned superset of the range, then one memcpy into the slot. Where
the filesystem refuses O_DIRECT (tmpfs, some overlays) it falls back to pread with a warning.
"""

from __future__ import annotations

import mmap
import os
from pathlib import Path

import numpy as np

from .._math import round_up
from ..errors import FileChangedError, warn
from .base import PAGE, ShardReader
from .pread import PreadShard

__all__ = ["DirectShard"]


class DirectShard(PreadShard):
    _open_flags = getattr(os, "O_DIRECT", 0)
    concurrent_copies = False   # one bounce buffer

    def __init__(self, path: Path, expected_size: int, *, max_read: int = 16 << 20, **kw):
        try:
            super().__init__(path, expected_size, **kw)
        except OSError as e:
            if not self._open_flags or isinstance(e, FileNotFoundError):
                raise
            self._warn(e)
            self._open_flags = 0
            super().__init__(path, expected_size, **kw)
        self._bounce = mmap.mmap(-1, max_read + 2 * PAGE)     # anonymous: page-aligned
        self._bounce_np = np.frombuffer(self._bounce, dtype=np.uint8)
        self._direct = bool(self._open_flags)

    def copy_into(self, lo: int, hi: int, dst: np.ndarray) -> None:
        if hi <= lo:
            return
        if not self._direct:
            return super().copy_into(lo, hi, dst)
        start = lo - lo % PAGE
        end = min(round_up(hi, PAGE), round_up(self.size, PAGE))
        step = len(self._bounce_np) - len(self._bounce_np) % PAGE
        for a in range(start, end, step):       # one read per bounce-buffer load
            b = min(end, a + step)
            try:
                got = os.preadv(self._fd, [memoryview(self._bounce)[:b - a]], a)
            except OSError as e:
                self._fall_back(e)
                return super().copy_into(lo, hi, dst)
            want = min(b, self.size) - a
            if got < want:
                self.verify()
                raise FileChangedError(f"{self.name}: unexpected end of file at byte {a + got}")
            s, t = max(lo, a), min(hi, b)
            dst[s - lo:t - lo] = self._bounce_np[s - a:t - a]

    def copy_strided(self, lo: int, stride: int, length: int, dst: np.ndarray) -> None:
        """A row at a time (an aligned read each): a span read would take every rank's columns
        from storage; for rows narrower than a page each read is still a whole page or two."""
        ShardReader.copy_strided(self, lo, stride, length, dst)

    def copy_ranges(self, lo: int, dsts: list[np.ndarray]) -> None:
        """One aligned O_DIRECT read of the whole run, then scatter (if it fits the bounce)."""
        total = sum(len(d) for d in dsts)
        if not self._direct:
            return super().copy_ranges(lo, dsts)
        if total + 2 * PAGE > len(self._bounce_np):
            return ShardReader.copy_ranges(self, lo, dsts)   # piece by piece through the bounce
        start = lo - lo % PAGE
        end = min(round_up(lo + total, PAGE), round_up(self.size, PAGE))
        try:
            got = os.preadv(self._fd, [memoryview(self._bounce)[:end - start]], start)
        except OSError as e:
            self._fall_back(e)
            return super().copy_ranges(lo, dsts)
        if got < min(end, self.size) - start:
            self.verify()
            raise FileChangedError(f"{self.name}: unexpected end of file at byte {start + got}")
        at = lo - start
        for d in dsts:
            d[:] = self._bounce_np[at:at + len(d)]
            at += len(d)

    def _warn(self, e: OSError) -> None:
        warn(f"mmapload: O_DIRECT on {self.name} refused ({e}); using pread "
                      "(the page cache will hold what is read)")

    def _fall_back(self, e: OSError) -> None:
        self._warn(e)
        self._direct = False
        self._open_flags = 0
        self._open()     # the validated file again, or FileChangedError

    def prefetch(self, lo: int, hi: int) -> None:
        if not self._direct:
            super().prefetch(lo, hi)   # O_DIRECT has no kernel read-ahead to ask for

    def close(self) -> None:
        self._bounce_np = None
        try:
            self._bounce.close()
        except BufferError:
            pass
        super().close()
