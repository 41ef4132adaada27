"""Readers of shard files, one per io mode, behind one factory.

    reader = open_reader("pread", shard, drop_page_cache=True, max_read=slot_bytes)

``base.ShardReader`` is the interface; ``mapped`` (mmap), ``pread`` and ``direct`` (O_DIRECT)
implement it. Which mode guarantees what when a file changes under a load: README, "Files that
change under a load".
"""

from __future__ import annotations

from .base import IOV_MAX, PAGE, ShardReader
from .direct import DirectShard
from .mapped import MappedShard
from .pread import PreadShard

__all__ = ["open_reader", "ShardReader", "MappedShard", "PreadShard", "DirectShard", "IOV_MAX", "PAGE"]


def open_reader(io: str, shard, *, drop_page_cache: bool, max_read: int) -> ShardReader:
    """The reader of ``shard`` (a checkpoint.Shard) for ``io``: its resolved file, checked to be
    the file validated (``Shard.ident``), named in messages as the user names it."""
    kw = dict(drop_page_cache=drop_page_cache, ident=shard.ident, name=shard.shown, cached=shard.cached)
    path = shard.real or shard.path
    if io in ("mmap", "view"):   # "view": the same map, quantized straight from it on the CPU (fill.py)
        return MappedShard(path, shard.file_size, **kw)
    if io == "pread":
        return PreadShard(path, shard.file_size, **kw)
    return DirectShard(path, shard.file_size, max_read=max_read, **kw)
