"""The reader interface every io mode implements, and what the modes share.

``ShardReader`` is what the reader thread sees, whatever the I/O mode: ``copy_into`` a slot,
``copy_ranges`` / ``copy_strided`` for runs of pieces, ``window`` for a transient look at file
bytes, ``prefetch`` ahead, ``release_behind`` what was copied. It owns the file descriptor and
checks that the file read is the file validated (``verify``). The modes live next to it:
``mapped.py`` (``io="mmap"``), ``pread.py`` (``io="pread"``), ``direct.py`` (``io="direct"``);
``readers.open_reader`` picks one.
"""

from __future__ import annotations

import mmap
import os
import time
from pathlib import Path

import numpy as np
import torch

from .._files import identity
from ..errors import FileChangedError
from .._pagecache import Cached, count_cached

__all__ = ["ShardReader", "PAGE", "IOV_MAX"]

PAGE = mmap.PAGESIZE


def _iov_max() -> int:
    try:
        n = os.sysconf("SC_IOV_MAX")
    except (ValueError, OSError, AttributeError):
        n = -1
    return n if n > 0 else 1024


IOV_MAX = _iov_max()   # buffers per vectored read (preadv, process_vm_readv): EINVAL above it


def _floor(x: int) -> int:
    return x - x % PAGE


def _ceil(x: int) -> int:
    return _floor(x + PAGE - 1)


class ShardReader:
    """One shard file whose size must stay ``expected_size``; subclasses say how to read.

    ``ident``: the file's ``identity()`` when its header was validated (``Shard.ident``); the
    file opened must be that file, unchanged, and stay so (``verify``), else FileChangedError.
    ``name``: how messages name it (``Shard.shown``); ``path`` is what is opened."""

    _open_flags = 0
    concurrent_copies = True    # copy_ranges of disjoint ranges may run on several threads

    def __init__(self, path: Path, expected_size: int, *, drop_page_cache: bool = True,
                 ident: tuple | None = None, name: str | None = None, cached: Cached | None = None):
        self.path = Path(path)
        self.name = name or str(self.path)
        self.size = expected_size
        self.ident = ident
        self.drop_page_cache = drop_page_cache
        self._released = 0          # bytes [0, _released) already given back
        self._fd = -1
        self._open()
        # what the page cache held before this load read (``Shard.cached``: before its header was
        # read): drop_page_cache drops only what the load read in; not given, all of it
        self.cached = cached if cached is not None else Cached(False)

    def _open(self) -> None:
        """(Re)open ``path`` and check it is the validated file."""
        # non-blocking: a FIFO swapped in for the shard must not hang open(); it fails verify()
        fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0) | self._open_flags)
        if self._fd >= 0:
            os.close(self._fd)
        self._fd = fd
        try:
            self.verify()
            os.set_blocking(fd, True)
        except BaseException:
            ShardReader.close(self)
            raise

    def verify(self) -> None:
        """FileChangedError unless the open file still has its validated size (and identity:
        device, inode, size, mtime). Readers call it before handing read bytes on."""
        st = os.fstat(self._fd)
        if st.st_size != self.size:
            raise FileChangedError(
                f"{self.name}: file is {st.st_size} bytes but its header describes {self.size}; "
                "it changed after the checkpoint was opened (do not rewrite shards while loading)")
        if self.ident is not None and identity(st) != tuple(self.ident):
            (dev, ino, _, mtime), now = self.ident, identity(st)
            what = ("was replaced by another file (device/inode "
                    f"{dev}/{ino} -> {now[0]}/{now[1]})" if now[:2] != (dev, ino) else
                    f"was rewritten in place (mtime {mtime} -> {now[3]} ns)")
            raise FileChangedError(
                f"{self.name}: {what} after its header was validated; load again once the "
                "checkpoint is complete (do not replace or rewrite shards while loading)")

    def _fadvise(self, lo: int, hi: int, advice: int) -> None:
        if hi > lo:
            try:
                os.posix_fadvise(self._fd, lo, hi - lo, advice)
            except (OSError, AttributeError):
                pass  # hints only

    def _read(self, offset: int, buf: memoryview) -> None:
        """pread file bytes from ``offset`` into all of ``buf``."""
        done = 0
        while done < len(buf):
            n = os.preadv(self._fd, [buf[done:]], offset + done)
            if n == 0:
                self.verify()  # the file shrank: say so, with both sizes
                raise FileChangedError(f"{self.name}: unexpected end of file at byte {offset + done}")
            done += n

    # -- what the reader thread uses -------------------------------------------------
    def copy_into(self, lo: int, hi: int, dst: np.ndarray) -> None:
        """Copy file bytes [lo, hi) into ``dst`` (a uint8 array of hi - lo bytes)."""
        raise NotImplementedError

    def copy_ranges(self, lo: int, dsts: list[np.ndarray]) -> None:
        """Copy consecutive file bytes from ``lo`` into each of ``dsts`` in turn."""
        for d in dsts:
            self.copy_into(lo, lo + len(d), d)
            lo += len(d)

    def copy_strided(self, lo: int, stride: int, length: int, dst: np.ndarray) -> None:
        """Copy ``len(dst) // length`` rows of ``length`` file bytes, row k from ``lo + k * stride``,
        into ``dst`` back to back: the rows of a piece narrower than its matrix (a TP row slice)."""
        for k in range(len(dst) // length):
            self.copy_ranges(lo + k * stride, [dst[k * length:(k + 1) * length]])

    def window(self, lo: int, hi: int, scratch: np.ndarray) -> torch.Tensor:
        """File bytes [lo, hi) as a uint8 tensor, valid until the next call (may use scratch)."""
        self.copy_into(lo, hi, scratch[:hi - lo])
        return torch.from_numpy(scratch[:hi - lo])

    def prefetch(self, lo: int, hi: int) -> None:
        """Ask the kernel to start reading [lo, hi) into the page cache."""
        self._fadvise(lo, min(hi, self.size), os.POSIX_FADV_WILLNEED)

    def release(self, lo: int, hi: int, *, drop_cache: bool | None = None) -> None:
        """Drop the whole pages inside [lo, hi) that this load read in from the page cache (if
        asked); pages cached before the shard was opened stay (``cached``)."""
        lo, hi = _ceil(lo), _floor(hi)
        if hi > lo and (self.drop_page_cache if drop_cache is None else drop_cache):
            for a, b in self.cached.read_in(lo, hi):
                self._fadvise(a, b, os.POSIX_FADV_DONTNEED)

    def forget(self, lo: int, hi: int) -> None:
        """Drop every page touching [lo, hi) from this process's RSS only (a map's pages; other
        processes and the page cache keep theirs): TP ranks share pages at their cuts."""

    def drop_unreleased(self, upto: int) -> None:
        """A load that stopped early (closed, an error, a guess found wrong): drop from the page
        cache what it read ahead up to ``upto`` and never released, where it read it in."""
        if upto <= self._released:
            return
        lo, hi = _ceil(self._released), upto if upto < self.size else _ceil(self.size)
        for _ in range(20 if self.drop_page_cache else 0):   # pages still being read ahead (locked
            ShardReader.release(self, lo, hi)                  # for I/O) are skipped: once done, again
            left = [count_cached(self._fd, a, b - a) for a, b in self.cached.read_in(lo, hi)]
            if None in left or not any(left):
                break
            time.sleep(0.01)
        self._released = min(upto, self.size)

    def release_behind(self, upto: int) -> None:
        """Release everything before ``upto`` not released yet (sequential reader)."""
        if upto > self._released:
            self.release(_floor(self._released), upto if upto < self.size else _ceil(self.size))
            self._released = _floor(upto) if upto < self.size else self.size

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
