"""The output folder of ``convert``: hidden work names, stale leftovers, extra files, the swap-in.

Work names are short whatever the destination's name: ``.<dst name>.mmapload-partial-<pid>``
(the partial output) and ``.<dst name>.mmapload-old-<pid>`` (an overwritten ``dst`` moved
aside), where ``<dst name>`` becomes ``mmapload-<hash>`` when the name is too long to carry
the suffix within a file name's 255 bytes.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from .checkpoint import INDEX_NAME
from .errors import CheckpointError, warn

__all__ = ["PARTIAL_MARK", "OLD_MARK", "work_name", "remove_stale_partials", "copy_extras", "fsync_path",
           "swap_in"]

PARTIAL_MARK = ".mmapload-partial-"
OLD_MARK = ".mmapload-old-"
_MAX_STEM = 200   # bytes: + "." + the longest mark (18) + a pid (<= 10 digits) stays under 255


def _stem(dst: Path) -> str:
    raw = os.fsencode(dst.name)
    return dst.name if len(raw) <= _MAX_STEM else "mmapload-" + hashlib.sha256(raw).hexdigest()[:16]


def work_name(dst: Path, mark: str = PARTIAL_MARK, pid: int | None = None) -> Path:
    """The hidden sibling of ``dst`` that this process (or ``pid``) uses for ``mark``."""
    return dst.parent / f".{_stem(dst)}{mark}{os.getpid() if pid is None else pid}"


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False   # ours from an earlier, killed process that had our pid: dead
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True   # exists, owned by someone else (or no pid at all: left alone)
    return True


def remove_stale_partials(dst: Path) -> list[Path]:
    """Delete the partial folders of ``dst`` left by processes that no longer run (a SIGKILL,
    a power loss); a live process's folder is left alone. Returns what was removed."""
    prefix = f".{_stem(dst)}{PARTIAL_MARK}"
    try:
        names = os.listdir(dst.parent)
    except FileNotFoundError:
        return []
    gone = []
    for name in names:
        pid = name[len(prefix):]
        if name.startswith(prefix) and pid.isascii() and pid.isdigit() and not _alive(int(pid)):
            path = dst.parent / name
            remove(path)
            gone.append(path)
    return gone


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _inside(root: Path, p: Path) -> bool:
    """``p`` is a regular file inside ``root`` after following links; a Hugging Face cache
    snapshot (``<repo>/snapshots/<rev>``) also owns its repo's ``blobs`` folder."""
    target = p.resolve()
    if root in target.parents:
        return True
    return root.parent.name == "snapshots" and target.parent == root.parent.parent / "blobs"


# weights in other formats (PyTorch pickles, TensorFlow, Flax, GGUF, ONNX) and their indexes: the
# source's high-precision model again, which the FP8 output must not carry
_OTHER_WEIGHTS = (".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx", ".bin.index.json",
                  ".pt.index.json", ".pth.index.json", ".h5.index.json", ".msgpack.index.json")


def copy_extras(root: Path, out: Path, qconfig: dict, config: dict | None = None) -> None:
    """config.json, tokenizer and generation files: every regular, non-hidden top-level file
    of the source folder except shards, the index and weights in other formats
    (``pytorch_model.bin``, ``*.pt``, ``tf_model.h5``, ... and their indexes), copied as they are, except that
    config.json gets ``quantization_config`` (any earlier one replaced). ``config``: config.json
    as already parsed (``foreign.read_config``), so it is not read again; None: read here. A
    symlink that leads out of the source folder is not copied (a ``MmapLoadWarning`` names it
    and its target)."""
    root = root.resolve()
    for p in sorted(root.iterdir()):
        if (p.name.startswith(".") or p.name.endswith(".safetensors") or p.name == INDEX_NAME
                or p.name.endswith(_OTHER_WEIGHTS) or not p.is_file()):
            continue
        if p.is_symlink() and not _inside(root, p):
            warn(f"{p}: not copied: it is a symlink to {p.resolve()}, outside the source folder "
                          f"{root}; copy the file into the output yourself if it belongs there")
            continue
        if p.name == "config.json":
            try:
                cfg = dict(config) if config is not None else json.loads(p.read_text("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise CheckpointError(f"{p}: not valid JSON ({e}); cannot add quantization_config") from None
            if not isinstance(cfg, dict):
                raise CheckpointError(f"{p}: holds a JSON {type(cfg).__name__}, not an object; "
                                      "cannot add quantization_config")
            cfg["quantization_config"] = qconfig
            (out / p.name).write_text(json.dumps(cfg, indent=2) + "\n", "utf-8")
        else:
            shutil.copyfile(p, out / p.name)
        fsync_path(out / p.name)


def remove(path: Path) -> None:
    """Delete a file, a link (never what it points to) or a folder tree."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def swap_in(tmp: Path, dst: Path, overwrite: bool) -> None:
    """Rename ``tmp`` onto ``dst`` (atomic: dst appears complete or not at all). With
    ``overwrite`` an existing dst (a link: the link itself) is first renamed aside, put back
    if the rename fails, and deleted once the new one is in place."""
    old = None
    if overwrite and (dst.exists() or dst.is_symlink()):
        old = work_name(dst, OLD_MARK)
        remove(old)
        os.rename(dst, old)
    try:
        os.rename(tmp, dst)
    except BaseException:
        if old is not None:
            os.rename(old, dst)
        raise
    fsync_path(dst.parent)
    if old is not None:
        remove(old)
