"""``PreadShard`` (``io="pread"``): ``preadv`` straight into the ring slot. For network
filesystems, where page-by-page faults are slow, and immune to SIGBUS when a file shrinks
under us (a short read becomes an error).
"""

from __future__ import annotations

import os

import numpy as np

from .base import IOV_MAX, ShardReader

__all__ = ["PreadShard"]


class PreadShard(ShardReader):
    def copy_into(self, lo: int, hi: int, dst: np.ndarray) -> None:
        if hi > lo:
            self._read(lo, memoryview(dst).cast("B"))

    def copy_ranges(self, lo: int, dsts: list[np.ndarray]) -> None:
        """One vectored read scatters a file-contiguous run into its slot places."""
        bufs = [memoryview(d).cast("B") for d in dsts if len(d)]
        for k in range(0, len(bufs), IOV_MAX):       # at most IOV_MAX buffers a call (EINVAL)
            part = bufs[k:k + IOV_MAX]
            got = os.preadv(self._fd, part, lo)
            for b in part:                 # a short read: finish buffer by buffer
                if got < len(b):
                    self._read(lo + got, b[got:])
                    got = len(b)
                lo, got = lo + len(b), got - len(b)
