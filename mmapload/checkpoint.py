"""Find the shards of a safetensors checkpoint and validate every header before any tensor moves.

Each file's header is parsed and validated by ``header.read_header`` (only its first bytes are
read: tensor data is never touched); this module finds the files and checks an index against them.

Layouts accepted by :func:`open_checkpoint`:
* a single file, whatever its suffix (a file not named ``*.safetensors`` is accepted if it parses);
* an index file (``*.index.json``, e.g. ``model.safetensors.index.json``): as its folder with that index;
* a folder holding ``model.safetensors.index.json``: the shards are the distinct files its
  ``weight_map`` names, loaded in file-name order; the map must agree exactly with the shards, and
  ``*.safetensors`` files it does not name are ignored;
* a folder without an index: every ``*.safetensors`` file directly inside it (not recursive), in
  file-name order (this covers a folder holding only ``model.safetensors``).

Only regular files are opened (a FIFO, a device or a directory named as a shard is a
``CheckpointError`` before ``open``, which would block on a FIFO). Shards keep the name the user gave
or the folder / index lists (``Shard.path``, ``TensorSpec.shard``: a Hugging Face cache snapshot's
``model-00001-of-00002.safetensors``, not the blob it links to); ``Shard.real`` is the resolved file,
and ``Shard.ident`` its (device, inode, size, mtime) when validated, which the readers check again.

Problems raise ``HeaderError``, ``ShardIndexError`` or ``CheckpointError`` naming the file, the tensor
and the byte offsets; ``OSError`` from the file system propagates as is (a missing file:
``FileNotFoundError``), except a missing checkpoint path (``CheckpointNotFoundError``, also a
``FileNotFoundError``), a symlink loop or a name too long, which are ``CheckpointError``.
"""

from __future__ import annotations

import json
import os
import pathlib
from dataclasses import dataclass, field

from mmapload._files import real_path, stat_shard
from mmapload.errors import CheckpointError, CheckpointNotFoundError, ShardIndexError
from mmapload.header import MAX_HEADER_BYTES, Shard, TensorSpec, read_header

# dtype names, bits and torch dtypes: mmapload.dtypes (the one table), not re-exported here
__all__ = ["MAX_HEADER_BYTES", "MAX_INDEX_BYTES", "INDEX_NAME", "TensorSpec", "Shard", "Checkpoint",
           "read_header", "open_checkpoint"]

MAX_INDEX_BYTES = MAX_HEADER_BYTES   # model.safetensors.index.json: a bigger one is refused unread
INDEX_NAME = "model.safetensors.index.json"


@dataclass(frozen=True)
class Checkpoint:
    """All shards in load order; look tensors up with ``ckpt[name]``, ``ckpt.get(name)``, ``name in ckpt``."""

    root: pathlib.Path
    shards: tuple[Shard, ...]
    _by_name: dict[str, TensorSpec] = field(init=False, repr=False, compare=False, hash=False)
    _tensors: tuple[TensorSpec, ...] = field(init=False, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:  # build the name -> spec dict once; names must be unique
        by_name: dict[str, TensorSpec] = {}
        tensors = self.shards[0].tensors if len(self.shards) == 1 else \
            tuple(spec for shard in self.shards for spec in shard.tensors)
        object.__setattr__(self, "_tensors", tensors)
        for spec in tensors:
            if (other := by_name.setdefault(spec.name, spec)) is not spec:
                raise ShardIndexError(f"tensor {spec.name!r} is stored twice: in {other.shard} (bytes "
                                      f"[{other.start}, {other.end})) and in {spec.shard} (bytes "
                                      f"[{spec.start}, {spec.end})); remove the stray shard")
        object.__setattr__(self, "_by_name", by_name)

    @property
    def tensors(self) -> tuple[TensorSpec, ...]:
        return self._tensors

    @property
    def total_bytes(self) -> int:
        return sum(spec.nbytes for spec in self._by_name.values())

    @property
    def largest(self) -> TensorSpec | None:
        return max(self.tensors, key=lambda spec: spec.nbytes, default=None)

    def __getitem__(self, name: str) -> TensorSpec:
        if name not in self._by_name:
            raise KeyError(f"no tensor {name!r} in checkpoint {self.root}")
        return self._by_name[name]

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def get(self, name: str, default: TensorSpec | None = None) -> TensorSpec | None:
        return self._by_name.get(name, default)


def _indexed(root: pathlib.Path, index: pathlib.Path) -> Checkpoint:
    """Load the shards ``index`` names, then check its weight_map against them both ways."""
    with open(index, "rb") as f:   # capped before reading, like a header
        size = os.fstat(f.fileno()).st_size
        if size > MAX_INDEX_BYTES:
            raise ShardIndexError(f"{index}: {size} bytes, over the {MAX_INDEX_BYTES}-byte limit for an "
                                  "index file; not a safetensors index, or corrupt: re-download it")
        raw = f.read(MAX_INDEX_BYTES + 1)
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise ShardIndexError(f"{index}: not valid UTF-8 JSON ({e}); re-download the index") from None
    weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
    if not isinstance(weight_map, dict):
        raise ShardIndexError(f"{index}: needs a \"weight_map\" object mapping tensor names to shard "
                              "files; re-download it, or delete it to load every *.safetensors file")
    # An empty map (what convert writes for a checkpoint of no tensors) names no shard: the
    # folder's *.safetensors files are read, and must hold no tensor (checked below).
    files = sorted(p for p in root.iterdir() if p.name.endswith(".safetensors") and p.is_file()) \
        if not weight_map else []
    if not weight_map and not files:
        raise ShardIndexError(f"{index}: its weight_map is empty and {root} holds no *.safetensors file; "
                              "re-download the checkpoint")
    real: dict[str, pathlib.Path] = {}   # index name -> resolved file: each name checked once, not per tensor
    for name, shard in weight_map.items():
        if isinstance(shard, str) and shard in real:
            continue
        rel = pathlib.PurePath(shard) if isinstance(shard, str) and shard else None
        if rel is None or rel.is_absolute() or ".." in rel.parts:
            raise ShardIndexError(f"{index}: weight_map maps tensor {name!r} to {shard!r}; expected the "
                                  "name of a shard file in the index's folder")
        try:
            stat_shard(root / shard)
        except FileNotFoundError:
            raise ShardIndexError(f"{index}: weight_map maps tensor {name!r} to shard {shard!r}, which is "
                                  f"missing from {root}; download it or regenerate the index") from None
        except CheckpointError as e:
            raise ShardIndexError(f"{index}: weight_map maps tensor {name!r} to shard {shard!r}: {e}") from None
        real[shard] = real_path(root / shard)
    by_real: dict[pathlib.Path, pathlib.Path] = {}  # resolved -> the index's (first) name for it
    for shard in sorted(real):
        by_real.setdefault(real[shard], root / shard)
    paths = list(by_real.values()) or files   # an empty map: the folder's files
    ckpt = Checkpoint(root, tuple(read_header(p) for p in paths))  # one read per file, in name order
    for name, shard in weight_map.items():
        spec = ckpt.get(name)
        if spec is None:
            raise ShardIndexError(f"{index}: weight_map maps tensor {name!r} to {shard!r}, but that shard "
                                  "does not contain it; the index and shards come from different saves")
        if spec.shard != by_real[real[shard]]:
            raise ShardIndexError(f"{index}: weight_map maps tensor {name!r} to {shard!r}, but it is in "
                                  f"{spec.shard} (bytes [{spec.start}, {spec.end})); regenerate the index")
    for spec in ckpt.tensors:
        if spec.name not in weight_map:
            raise ShardIndexError(f"{index}: tensor {spec.name!r} in {spec.shard} (bytes [{spec.start}, "
                                  f"{spec.end})) is absent from weight_map; the index is incomplete")
    return ckpt


def open_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Discover and validate every shard of ``path`` (a file or a folder); see the module docstring."""
    given = pathlib.Path(os.path.abspath(path))
    if not os.path.lexists(given):
        raise CheckpointNotFoundError(f"{given}: no such file or folder; pass a safetensors file, a folder of "
                                      "shards or its model.safetensors.index.json")
    root = real_path(given)
    if not root.is_dir() and given.name.endswith(".index.json") and root.is_file():
        return _indexed(root.parent, root)   # the index file itself: its folder's shards
    if not root.is_dir():  # a missing path raises FileNotFoundError from os.stat
        return Checkpoint(root, (read_header(given),))
    if (root / INDEX_NAME).is_file():
        return _indexed(root, root / INDEX_NAME)
    # every *.safetensors entry but directories (never shards); a FIFO, a device or a link to
    # nowhere is an error from read_header, not silently a missing shard
    files = sorted((p for p in root.iterdir() if p.name.endswith(".safetensors") and not p.is_dir()),
                   key=lambda p: p.name)
    if not files:
        raise CheckpointError(f"{root}: folder holds neither {INDEX_NAME} nor any *.safetensors file; "
                              "point at a safetensors file or a folder of shards")
    return Checkpoint(root, tuple(read_header(p) for p in files))
