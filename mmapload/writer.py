"""A streaming safetensors writer: the header first, then tensors one at a time.

The header is computable from names, dtypes and shapes alone, so a file can be written
without ever holding all of its tensors. The file is written under a short temporary name
(``.mmapload-<pid>-<n>.partial``: the file's own name may be near the 255-byte limit) and
renamed into place only by ``commit()``: a failure never leaves a complete-looking file.

With ``sync_bytes`` set, written data does not pile up as dirty page cache (which counts
against a cgroup memory limit): every ``sync_bytes`` the range just written is handed to the disk
(``sync_file_range(WRITE)``, which does not wait), the range before it is waited for and dropped
from the page cache (``POSIX_FADV_DONTNEED``): the disk writes one window while the next is
computed, and at most two windows are dirty or under writeback. Where ``sync_file_range`` is
missing (not Linux, a seccomp profile), each window is ``fdatasync``-ed in turn, waiting for it.
``commit()`` fsyncs the whole file.
"""

from __future__ import annotations

import ctypes
import itertools
import json
import os
from pathlib import Path
from typing import Sequence

import torch

from ._libc import function
from .dtypes import dtype_name, nbytes_of, torch_dtype_of, torch_shape

__all__ = ["SafetensorsWriter"]

_SEQ = itertools.count()   # temporary names unique within this process
# sync_file_range(2) flags (linux/fs.h); through ctypes, which releases the GIL while the disk works
_WAIT_BEFORE, _WRITE, _WAIT_AFTER = 1, 2, 4
_sfr = function("sync_file_range", (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint))


def _header_dtype(dtype: str | torch.dtype) -> str:
    """An entry's dtype as its safetensors name (a torch dtype is translated)."""
    if isinstance(dtype, torch.dtype):
        return dtype_name(dtype)
    torch_dtype_of(dtype)   # ValueError naming the known ones for a name safetensors lacks
    return dtype


class SafetensorsWriter:
    """``SafetensorsWriter(path, [(name, dtype, shape), ...])``, then ``write(name, t)`` in
    that order, then ``commit()``. Used as a context manager, an exception discards the file.

    ``dtype`` is a safetensors name ("BF16", "F6_E2M3", ...) or a torch dtype, and ``shape``
    the header's shape; both are written to the header as given. ``t`` must be what the
    loader yields for that entry: ``dtypes.torch_dtype_of(dtype)`` of
    ``dtypes.torch_shape(dtype, shape)`` (for F4 / F6 / raw dtypes, not the header shape).

    ``sync_bytes`` (0: off): flush, ``fdatasync`` and drop from the page cache every that
    many bytes written (big tensors are written in pieces of that size)."""

    def __init__(self, path, entries: Sequence[tuple[str, str | torch.dtype, tuple[int, ...]]],
                 metadata: dict[str, str] | None = None, *, sync_bytes: int = 0):
        if isinstance(sync_bytes, bool) or not isinstance(sync_bytes, int) or sync_bytes < 0:
            raise ValueError(f"sync_bytes must be a non-negative int, got {sync_bytes!r}")
        self.path = Path(path)
        self.sync_bytes = sync_bytes
        self.tmp = self.path.with_name(f".mmapload-{os.getpid()}-{next(_SEQ)}.partial")
        header: dict = {"__metadata__": dict(metadata)} if metadata else {}
        self._order: list[tuple[str, torch.dtype, tuple[int, ...], int]] = []   # what write() takes
        offset = 0
        for name, dtype, shape in entries:
            if name in header:
                raise ValueError(f"duplicate tensor name {name!r}")
            dtype = _header_dtype(dtype)
            n = nbytes_of(dtype, shape)
            header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
            self._order.append((name, torch_dtype_of(dtype), torch_shape(dtype, shape), n))
            offset += n
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)   # keep the data section 8-byte aligned
        self.data_bytes = offset
        self.header_bytes = 8 + len(raw)
        self._next = 0
        self._f = open(self.tmp, "wb")
        self._f.write(len(raw).to_bytes(8, "little") + raw)
        self._pos, self._synced = self.header_bytes, 0   # bytes written; bytes synced and dropped
        self._started = 0   # bytes handed to the disk (sync_file_range WRITE), not yet waited for
        self._async = _sfr is not None

    @property
    def size(self) -> int:
        """The finished file's size in bytes."""
        return self.header_bytes + self.data_bytes

    def _sync(self, final: bool = False) -> None:
        """Hand what was written since the last call to the disk without waiting; wait for the window
        before it and drop that from the page cache (``final``: wait for everything and drop it)."""
        self._f.flush()
        fd = self._f.fileno()
        if self._async:
            if _sfr(fd, self._started, self._pos - self._started, _WRITE) == 0:
                done = self._pos if final else self._started   # the previous window, or all
                if done > self._synced and _sfr(fd, self._synced, done - self._synced,
                                                _WAIT_BEFORE | _WRITE | _WAIT_AFTER) == 0:
                    self._drop(fd, done)
                self._started = self._pos
                return
            self._async = False   # refused here: wait for each window instead
        os.fdatasync(fd)
        self._drop(fd, self._pos)
        self._started = self._pos

    def _drop(self, fd: int, upto: int) -> None:
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, self._synced, upto - self._synced, os.POSIX_FADV_DONTNEED)
        self._synced = upto

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if self._next >= len(self._order):
            raise ValueError(f"{self.path}: unexpected tensor {name!r}; all tensors written")
        want, dtype, shape, n = self._order[self._next]
        if name != want or tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise ValueError(f"{self.path}: expected {want!r} {dtype} {shape}, got {name!r} "
                             f"{tensor.dtype} {tuple(tensor.shape)}")
        if n:
            t = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
            mv = memoryview(t.numpy())
            step = self.sync_bytes or n
            try:
                for i in range(0, n, step):
                    self._f.write(mv[i:i + step])
                    self._pos += min(step, n - i)
                    if self.sync_bytes and self._pos - self._started >= self.sync_bytes:
                        self._sync()
            except OSError as e:   # a full disk, a quota: say which file and what was being written
                if e.filename is not None:
                    raise
                raise OSError(e.errno, f"{e.strerror} (writing tensor {name!r}, {n:,} bytes, at byte "
                              f"{self._pos:,} of the file)", str(self.tmp)) from e
        self._next += 1

    def commit(self) -> Path:
        if self._next != len(self._order):
            raise ValueError(f"{self.path}: only {self._next} of {len(self._order)} tensors written")
        self._f.flush()
        os.fsync(self._f.fileno())
        if self.sync_bytes:
            self._sync(final=True)
        self._f.close()
        os.replace(self.tmp, self.path)
        return self.path

    def discard(self) -> None:
        if not self._f.closed:
            self._f.close()
        self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> "SafetensorsWriter":
        return self

    def __exit__(self, exc_type, *_) -> None:
        if exc_type is not None:
            self.discard()
        elif not self._f.closed:
            self.commit()
