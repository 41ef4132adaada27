"""Opening shard files safely: regular files only, never blocking, named as the user names them.

``stat_shard`` refuses what is not a regular file before anything opens it (``open()`` of a FIFO
blocks until a writer comes); ``open_regular`` opens non-blocking and checks the opened file
again, so a FIFO swapped in between cannot hang us either. ``identity`` is what the readers
compare with what was validated (a shard replaced or rewritten since is a FileChangedError).
"""

from __future__ import annotations

import errno
import os
import pathlib
import stat

from .errors import CheckpointError

__all__ = ["identity", "shown", "real_path", "stat_shard", "open_regular"]


def identity(st: os.stat_result) -> tuple[int, int, int, int]:
    """What "the same file, unchanged" means for a shard: (device, inode, size, mtime in ns)."""
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def shown(path: pathlib.Path, real: pathlib.Path | None) -> str:
    return f"{path} (-> {real})" if real is not None and real != path else str(path)


def real_path(path: pathlib.Path) -> pathlib.Path:
    """``path`` resolved; a symlink loop is a CheckpointError (pathlib raises RuntimeError)."""
    try:
        return path.resolve()
    except RuntimeError:
        raise CheckpointError(f"{path}: is a symbolic link that loops back to itself (ELOOP); remove it "
                              "or point it at the shard file") from None


_KINDS = {stat.S_IFIFO: "a FIFO (named pipe)", stat.S_IFDIR: "a directory", stat.S_IFCHR: "a character device",
          stat.S_IFBLK: "a block device", stat.S_IFSOCK: "a socket"}


def _check_regular(st: os.stat_result, where: str) -> None:
    if not stat.S_ISREG(st.st_mode):
        kind = _KINDS.get(stat.S_IFMT(st.st_mode), "not a regular file")
        raise CheckpointError(f"{where}: is {kind}, not a regular file; a safetensors shard must be a "
                              "regular file: point at the checkpoint's .safetensors file or its folder")


def stat_shard(path: pathlib.Path) -> os.stat_result:
    """``os.stat`` of a would-be shard: a regular file, else CheckpointError (before any open());
    a symlink loop or a name too long is a CheckpointError too; other OSErrors propagate."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        if os.path.islink(path):
            raise CheckpointError(f"{path}: is a symbolic link to {os.readlink(path)}, which does not exist; "
                                  "download the missing file or remove the link") from None
        raise
    except OSError as e:
        if e.errno not in (errno.ELOOP, errno.ENAMETOOLONG):
            raise
        raise CheckpointError(f"{str(path)[:200]}{'...' if len(str(path)) > 200 else ''}: cannot be opened: "
                              f"{e.strerror} ({errno.errorcode.get(e.errno, e.errno)}); fix the file name "
                              "or the symbolic link") from None
    _check_regular(st, str(path))
    return st


def open_regular(path: pathlib.Path, where: str, flags: int = 0) -> int:
    """An fd of the regular file ``path``: opened non-blocking (a FIFO swapped in cannot hang us),
    checked to be a regular file, then made blocking again."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0) | flags)
    try:
        _check_regular(os.fstat(fd), where)
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd
