"""Reading shards: read-only memory maps (default), with read-ahead and release-behind.

``ShardReader`` is what the reader thread sees, whatever the I/O mode: ``copy_into`` a slot,
``window`` for a transient look at file bytes, ``prefetch`` ahead, ``release_behind`` what
was copied. ``MappedShard`` maps the file; pread.py has the pread and O_DIRECT readers.

Copies out of the map go through the kernel (``process_vm_readv`` on our own address space),
so a file truncated under us is a short copy, reported as ``FileChangedError``, never the
SIGBUS a plain memcpy out of a vanished page dies of. Views of a map are numpy arrays, so
they hold the buffer export: the map cannot be closed under a live view (``torch.frombuffer``
does not hold it and a closed map then segfaults).
Resident memory stays bounded because the reader releases what it has copied:
``madvise(MADV_DONTNEED)`` drops the pages from this process's RSS and
``posix_fadvise(POSIX_FADV_DONTNEED)`` drops them from the page cache, which a container's
memory limit would otherwise count against us.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import mmap
import os
import warnings
from pathlib import Path

import numpy as np
import torch

from ._files import identity
from .errors import FileChangedError

__all__ = ["ShardReader", "MappedShard", "PAGE", "IOV_MAX"]

PAGE = mmap.PAGESIZE
# Named in Python 3.13+; value 22 on Linux >= 5.14. Pre-faulting a range turns the SIGBUS a
# truncated file would raise on access into an EFAULT we can report as an error.
_MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22)


def _iov_max() -> int:
    try:
        n = os.sysconf("SC_IOV_MAX")
    except (ValueError, OSError, AttributeError):
        n = -1
    return n if n > 0 else 1024


IOV_MAX = _iov_max()   # buffers per vectored read (preadv, process_vm_readv): EINVAL above it


class _Iovec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


# Through ctypes, which releases the GIL (mmap.madvise holds it for the whole fault-in).
# process_vm_readv on our own map copies like memcpy, but through the kernel: a page the file
# lost since it was mapped (truncated under us) makes it stop short or fail with EFAULT,
# where a memcpy would die of SIGBUS.
_madvise = _pvr = None
try:
    _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    _madvise = _libc.madvise
    _madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    _pvr = _libc.process_vm_readv
    _pvr.argtypes = (ctypes.c_int, ctypes.POINTER(_Iovec), ctypes.c_ulong, ctypes.POINTER(_Iovec),
                     ctypes.c_ulong, ctypes.c_ulong)
    _pvr.restype = ctypes.c_ssize_t
except (OSError, AttributeError):
    pass


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
                 ident: tuple | None = None, name: str | None = None):
        self.path = Path(path)
        self.name = name or str(self.path)
        self.size = expected_size
        self.ident = ident
        self.drop_page_cache = drop_page_cache
        self._released = 0          # bytes [0, _released) already given back
        self._fd = -1
        self._open()

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

    def copy_strided(self, lo: int, stride: int, dsts: list[np.ndarray]) -> None:
        """Copy ``len(dsts[k])`` file bytes from ``lo + k * stride`` into each ``dsts[k]``: the
        rows of a piece narrower than its matrix."""
        for k, d in enumerate(dsts):
            self.copy_ranges(lo + k * stride, [d])

    def window(self, lo: int, hi: int, scratch: np.ndarray) -> torch.Tensor:
        """File bytes [lo, hi) as a uint8 tensor, valid until the next call (may use scratch)."""
        self.copy_into(lo, hi, scratch[:hi - lo])
        return torch.from_numpy(scratch[:hi - lo])

    def prefetch(self, lo: int, hi: int) -> None:
        """Ask the kernel to start reading [lo, hi) into the page cache."""
        self._fadvise(lo, min(hi, self.size), os.POSIX_FADV_WILLNEED)

    def release(self, lo: int, hi: int, *, drop_cache: bool | None = None) -> None:
        """Drop the whole pages inside [lo, hi) from the page cache (if asked)."""
        lo, hi = _ceil(lo), _floor(hi)
        if hi > lo and (self.drop_page_cache if drop_cache is None else drop_cache):
            self._fadvise(lo, hi, os.POSIX_FADV_DONTNEED)

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


class MappedShard(ShardReader):
    """A read-only map of the shard: zero-copy windows, page faults for reads."""

    def __init__(self, path: Path, expected_size: int, **kw):
        super().__init__(path, expected_size, **kw)
        self._populate_ok = True
        try:
            self._mm = mmap.mmap(self._fd, 0, access=mmap.ACCESS_READ)
        except BaseException:
            super().close()
            raise
        self._array = np.frombuffer(self._mm, dtype=np.uint8)
        self._addr = self._array.ctypes.data
        self._kernel_copies = _pvr is not None   # SIGBUS-proof copies (see _pvr)
        self._advise(mmap.MADV_SEQUENTIAL, 0, self.size)

    def _advise(self, option: int, lo: int, hi: int) -> None:
        lo, hi = _floor(lo), min(_ceil(hi), _ceil(self.size))
        if hi > lo:
            try:
                self._mm.madvise(option, lo, hi - lo)
            except OSError:
                pass  # hints only: a kernel that refuses one still reads correctly

    def view(self, lo: int, hi: int) -> np.ndarray:
        """Zero-copy uint8 view of file bytes [lo, hi). Holds the map open while alive."""
        if not 0 <= lo <= hi <= self.size:
            raise ValueError(f"{self.name}: range [{lo}, {hi}) outside the file (0..{self.size})")
        return self._array[lo:hi]

    def tensor(self, lo: int, hi: int) -> torch.Tensor:
        """Zero-copy uint8 tensor of file bytes [lo, hi), read-only by contract.

        Through numpy so the buffer export is held. torch warns (once per process) that the
        array is not writable; nothing here writes to it, so that warning is noise.
        """
        view = self.view(lo, hi)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            return torch.from_numpy(view)

    def populate(self, lo: int, hi: int) -> None:
        """Fault [lo, hi) in with one syscall; a file truncated under us becomes an error."""
        self.verify()
        if not self._populate_ok or hi <= lo:
            return
        start = _floor(lo)
        length = min(_ceil(hi), _ceil(self.size)) - start
        try:
            if _madvise is None:
                self._mm.madvise(_MADV_POPULATE_READ, start, length)
            elif _madvise(self._addr + start, length, _MADV_POPULATE_READ) != 0:
                err = ctypes.get_errno()
                raise OSError(err, os.strerror(err))
        except OSError as e:
            if e.errno == errno.EFAULT:
                raise FileChangedError(
                    f"{self.name}: bytes [{lo}, {hi}) can no longer be read (file truncated or "
                    "replaced while loading)") from None
            self._populate_ok = False  # EINVAL: kernel older than 5.14; plain faults still work

    def _kernel_copy(self, lo: int, dsts: list[np.ndarray]) -> bool:
        """Map bytes from ``lo`` into ``dsts`` via process_vm_readv; False if that syscall is
        not allowed here (seccomp), and the caller must copy itself."""
        for k in range(0, len(dsts), IOV_MAX):
            part = dsts[k:k + IOV_MAX]
            n = sum(len(d) for d in part)
            local = (_Iovec * len(part))(*[(d.ctypes.data, len(d)) for d in part])
            remote = _Iovec(self._addr + lo, n)
            got = _pvr(os.getpid(), local, len(part), ctypes.byref(remote), 1, 0)
            if got != n:
                err = ctypes.get_errno() if got < 0 else errno.EFAULT
                if got < 0 and err in (errno.EPERM, errno.ENOSYS) and k == 0:
                    return False
                self.verify()   # the file shrank: say so, with both sizes
                raise FileChangedError(
                    f"{self.name}: bytes [{lo + max(got, 0)}, {lo + n}) can no longer be read from the "
                    f"map ({os.strerror(err)}; file truncated or replaced while loading?)")
            lo += n
        return True

    def copy_ranges(self, lo: int, dsts: list[np.ndarray]) -> None:
        dsts = [d for d in dsts if len(d)]
        self.verify()
        if self._kernel_copies and self._kernel_copy(lo, dsts):
            return
        self._kernel_copies = False
        self.populate(lo, lo + sum(len(d) for d in dsts))   # one fault-in for the run
        for d in dsts:
            np.copyto(d, self.view(lo, lo + len(d)))
            lo += len(d)

    def copy_into(self, lo: int, hi: int, dst: np.ndarray) -> None:
        self.copy_ranges(lo, [dst[:hi - lo]])

    def copy_strided(self, lo: int, stride: int, dsts: list[np.ndarray]) -> None:
        """With pread, not through the map: faulting each short row into our RSS and dropping it
        again row by row (an madvise each, TLB shootdowns included) measured 3-4x slower."""
        self.verify()
        for k, d in enumerate(dsts):
            self._read(lo + k * stride, memoryview(d).cast("B"))

    def window(self, lo: int, hi: int, scratch: np.ndarray) -> torch.Tensor:
        if self._kernel_copies:   # a copy, so that the caller never touches the map itself
            return super().window(lo, hi, scratch)
        self.populate(lo, hi)
        return self.tensor(lo, hi)  # zero-copy; the caller releases [lo, hi) from RSS after

    def prefetch(self, lo: int, hi: int) -> None:
        self._advise(mmap.MADV_WILLNEED, lo, hi)

    def release(self, lo: int, hi: int, *, drop_cache: bool | None = None) -> None:
        """Drop the whole pages inside [lo, hi) from RSS and (optionally) the page cache."""
        a, b = _ceil(lo), _floor(hi)
        if b > a:
            self._advise(mmap.MADV_DONTNEED, a, b)
        super().release(lo, hi, drop_cache=drop_cache)

    def close(self) -> None:
        if self._fd < 0:
            return
        self._array = None
        try:
            self._mm.close()
        except BufferError:
            pass  # a view is still alive; the map closes when it is collected
        super().close()
