"""Reading shards: read-only memory maps (default), with read-ahead and release-behind.

``MappedShard`` (``io="mmap"``) maps the file; base.py has the interface, pread.py and direct.py
the modes that copy with system calls.

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
import errno
import mmap
import os
import warnings
from pathlib import Path

import numpy as np
import torch

from .._libc import function
from ..errors import FileChangedError
from .base import IOV_MAX, ShardReader, _ceil, _floor

__all__ = ["MappedShard"]

# Named in Python 3.13+; value 22 on Linux >= 5.14. Pre-faulting a range turns the SIGBUS a
# truncated file would raise on access into an EFAULT we can report as an error.
_MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22)
_FOLIO, _AROUND = 2 << 20, 64 << 10   # the largest page-cache folio a fault maps; fault_around_bytes
_DENSE, _STRIDED_SPAN = 64 << 10, 4 << 20   # strided rows through the map: row stride, file span per call


class _Iovec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


# Through ctypes, which releases the GIL (mmap.madvise holds it for the whole fault-in).
# process_vm_readv on our own map copies like memcpy, but through the kernel: a page the file
# lost since it was mapped (truncated under us) makes it stop short or fail with EFAULT,
# where a memcpy would die of SIGBUS.
_madvise = function("madvise", (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int))
_pvr = function("process_vm_readv", (ctypes.c_int, ctypes.POINTER(_Iovec), ctypes.c_ulong, ctypes.POINTER(_Iovec),
                                     ctypes.c_ulong, ctypes.c_ulong), ctypes.c_ssize_t)



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
        lo, hi = max(0, _floor(lo)), min(_ceil(hi), _ceil(self.size))
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

    def populate(self, lo: int, hi: int, *, uncached_only: bool = False) -> None:
        """Fault [lo, hi) in with one syscall; a file truncated under us becomes an error.

        ``uncached_only``: only the parts the page cache lacked when the shard was opened (their
        disk reads, ahead of the consumer: a cold 4 GiB view load took 8.4 s without, 6.7 s with);
        io="view" leaves cached pages to the consumer's own faults, which map them for less CPU
        than MADV_POPULATE_READ (0.9 CPU s less over a warm 4 GiB view load here)."""
        self.verify()
        if not self._populate_ok or hi <= lo:
            return
        start, end = _floor(lo), min(_ceil(hi), _ceil(self.size))
        for a, b in self.cached.read_in(start, end) if uncached_only else [(start, end)]:
            self._populate(a, b - a, lo, hi)

    def _populate(self, start: int, length: int, lo: int, hi: int) -> None:
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

    def copy_strided(self, lo: int, stride: int, length: int, dst: np.ndarray) -> None:
        """Dense rows (TP row slices: ``stride`` <= 64 KiB) through the kernel, one
        process_vm_readv per run of rows spanning <= 4 MiB (SIGBUS-proof; ~3.6x a pread per row
        for 2 KiB rows of 16 KiB), each run's pages dropped from our RSS after it, so what the
        faults map (whole folios, other ranks' bytes) stays bounded. Sparse rows with a pread
        each: faulting every far-apart row into our RSS and dropping it again measured 3-4x slower."""
        self.verify()
        rows = len(dst) // length
        per = min(IOV_MAX, max(1, _STRIDED_SPAN // stride))
        if self._kernel_copies and stride <= _DENSE and rows > 1:
            for k0 in range(0, rows, per):
                n = min(per, rows - k0)
                at = lo + k0 * stride
                remote = np.empty((n, 2), dtype=np.uint64)     # struct iovec {base, len}
                remote[:, 0] = self._addr + at + np.arange(n, dtype=np.uint64) * stride
                remote[:, 1] = length
                local = _Iovec(dst.ctypes.data + k0 * length, n * length)
                got = _pvr(os.getpid(), ctypes.byref(local), 1,
                           ctypes.cast(remote.ctypes.data, ctypes.POINTER(_Iovec)), n, 0)
                self.forget(at, at + (n - 1) * stride + length)
                if got == n * length:
                    continue
                err = ctypes.get_errno() if got < 0 else errno.EFAULT
                if got < 0 and err in (errno.EPERM, errno.ENOSYS) and k0 == 0:
                    self._kernel_copies = False
                    break
                self.verify()
                raise FileChangedError(
                    f"{self.name}: rows from byte {at} (stride {stride}) can no longer be read from the "
                    f"map ({os.strerror(err)}; file truncated or replaced while loading?)")
            else:
                return
        for k in range(rows):
            self._read(lo + k * stride, memoryview(dst[k * length:(k + 1) * length]).cast("B"))

    def window(self, lo: int, hi: int, scratch: np.ndarray) -> torch.Tensor:
        if self._kernel_copies:   # a copy, so that the caller never touches the map itself
            return super().window(lo, hi, scratch)
        self.populate(lo, hi)
        return self.tensor(lo, hi)  # zero-copy; the caller releases [lo, hi) from RSS after

    def prefetch(self, lo: int, hi: int) -> None:
        self._advise(mmap.MADV_WILLNEED, lo, hi)

    def forget(self, lo: int, hi: int) -> None:
        """A fault maps more than the page it needs, before and after it: the fault-around window
        (64 KiB by default) and whole large folios of the page cache (512 KiB measured here for a
        4 KiB copy; at most a 2 MiB PMD), other ranks' bytes included. All of that goes."""
        self._advise(mmap.MADV_DONTNEED, lo - lo % _FOLIO - _AROUND, hi + -hi % _FOLIO + _AROUND)

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
