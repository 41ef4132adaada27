"""One safetensors file's header, parsed and validated before any tensor moves.

Parsed with stdlib ``json`` (never through the safetensors library); only the 8-byte length prefix
and the JSON header are read, tensor data never. Judged as the safetensors library judges it
(README, "Bad input"): the same header cap, extra entry keys ignored, unpaired surrogate escapes
refused; on purpose stricter: a key repeated in one JSON object is refused. Every tensor must tile
the data section exactly (no hole, overlap or tail). Problems raise ``HeaderError`` (or
``FileChangedError`` for a file that shrinks while read) naming the file, the tensor, the byte
offsets and the fix. ``checkpoint.py`` finds the files of a checkpoint and calls ``read_header``.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import NamedTuple, NoReturn

import torch

from mmapload._files import identity, open_regular, real_path, shown, stat_shard
from mmapload._pagecache import Cached
from mmapload.dtypes import BITS, DTYPES, nbytes_of, torch_dtype_of, torch_shape
from mmapload.errors import FileChangedError, HeaderError

__all__ = ["MAX_HEADER_BYTES", "TensorSpec", "Shard", "read_header"]

MAX_HEADER_BYTES = 100_000_000     # safetensors' MAX_HEADER_SIZE: the same files are refused unread
_ENTRY_KEYS = ["data_offsets", "dtype", "shape"]
_FIX = "re-download or re-save the checkpoint"
_INT64_MAX = 2**63 - 1


class TensorSpec(NamedTuple):
    """Where one tensor lives: ``start``/``end`` are absolute byte offsets in ``shard``.

    ``dtype`` and ``shape`` are the header's (safetensors names: "BF16", "F4", ...). Loaded,
    a tensor that is not quantized comes out as ``torch_dtype`` of ``torch_shape``, holding the
    file's bytes: the dtype's own torch dtype and the header's shape where torch has one;
    ``torch.uint8`` bytes where the installed torch has none (``raw``); see ``torch_shape``.

    An immutable record (a NamedTuple: a header may hold millions of entries, and building a
    tuple costs half of what a frozen dataclass does); ``read_header`` validates it.
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    shard: pathlib.Path
    start: int
    end: int

    @property
    def torch_dtype(self) -> torch.dtype:
        return torch_dtype_of(self.dtype)

    @property
    def torch_shape(self) -> tuple[int, ...]:
        return torch_shape(self.dtype, self.shape)

    @property
    def raw(self) -> bool:
        """The installed torch has no dtype for it: it travels as ``torch.uint8`` bytes."""
        return self.dtype not in DTYPES

    @property
    def itemsize(self) -> int:
        """Bytes per element of ``torch_dtype`` (whole bytes, also for F4 / F6)."""
        return self.torch_dtype.itemsize

    @property
    def numel(self) -> int:
        """Values in the header's shape (for F4 / F6 not the torch tensor's numel)."""
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class Shard:
    """One validated ``.safetensors`` file; ``tensors`` are in file order.

    ``path``: the name the user sees (as given, or folder / index name); ``real``: the file it
    resolves to, which is what is read; ``ident``: ``identity()`` of that file when validated;
    ``cached``: which of its pages the page cache held before its header was read (a load drops
    from the page cache only what it read in, header pages included)."""

    path: pathlib.Path
    data_start: int
    file_size: int
    tensors: tuple[TensorSpec, ...]
    metadata: dict[str, str] = field(default_factory=dict, hash=False)
    real: pathlib.Path | None = None
    ident: tuple[int, int, int, int] | None = None
    cached: Cached | None = field(default=None, compare=False, hash=False, repr=False)

    @property
    def shown(self) -> str:
        """``path``, followed by the resolved file where that is another one (a symlink)."""
        return shown(self.path, self.real)


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    out = dict(pairs)
    if len(out) != len(pairs):
        dup = next(key for key, n in Counter(key for key, _ in pairs).items() if n > 1)
        raise ValueError(f"the key {dup!r} appears twice in one object")
    return out


def _parse_json(raw: bytes, path: pathlib.Path) -> dict:
    span = f"{path}: header (file bytes [8, {8 + len(raw)}))"
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except UnicodeDecodeError as e:
        raise HeaderError(f"{span} is not UTF-8 (bad byte at file offset {8 + e.start}); "
                          f"not a safetensors file, or corrupt: {_FIX}") from None
    except (ValueError, RecursionError) as e:  # bad JSON, a repeated key, an int too long, deep nesting
        raise HeaderError(f"{span} is not valid JSON ({e}); not a safetensors file, or corrupt: "
                          f"{_FIX}") from None
    if not isinstance(header, dict):
        raise HeaderError(f"{span} is a JSON {type(header).__name__}, expected an object mapping "
                          f"tensor names to entries; {_FIX}")
    if _SURROGATE.search(raw):   # rare: only then look at every string
        bad = next((t for t in _strings(header) if not t.isascii() and _unencodable(t)), None)
        if bad is not None:
            raise HeaderError(f"{span} holds the string {bad!r} with an unpaired UTF-16 surrogate escape "
                              f"(\\udXXX): no UTF-8 text; safetensors refuses it, and a name cannot be "
                              f"written back; {_FIX}")
    return header


_SURROGATE = re.compile(rb"\\u[dD][89a-fA-F]")   # a \uD800-\uDFFF escape (or something like it)


def _strings(value: object):
    """Every key and string anywhere inside a parsed JSON value."""
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            yield v
        elif isinstance(v, dict):
            yield from v.keys()
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)


def _unencodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _entry(path: pathlib.Path, name: str, entry: object, data_start: int, *, _spec=TensorSpec, _bits=BITS,
           _prod=math.prod, _list=list, _int=int) -> TensorSpec:
    """One header entry as a TensorSpec: the checks of ``_refuse`` in a fast path (headers may hold
    millions of entries; the defaults bind globals as locals), which builds the message when one fails."""
    try:   # keys beyond these three are ignored, as safetensors does
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        bits = _bits[dtype]   # a str key (a list or dict is unhashable: TypeError)
        if type(shape) is _list and type(offsets) is _list and len(offsets) == 2:
            begin, end = offsets
            shape = tuple(shape)
            # min() first: it raises TypeError on mixed types, and is C-speed on a long shape
            if type(begin) is _int and type(end) is _int and 0 <= begin <= end \
                    and (not shape or (min(shape) >= 0 and all(type(d) is _int for d in shape))) \
                    and (end - begin) * 8 == _prod(shape) * bits:
                if begin == end and 0 in shape and (len(shape) > 2 or max(shape) > _INT64_MAX):
                    _fits_torch(path, name, shape, data_start + begin)   # rare: see there
                return _spec(name, dtype, shape, path, data_start + begin, data_start + end)
    except (TypeError, KeyError, IndexError):
        pass
    _refuse(path, name, entry, data_start)


def _fits_torch(path: pathlib.Path, name: str, shape: tuple[int, ...], start: int) -> None:
    # Non-empty tensors are bounded by their bytes; an empty one is not: torch holds sizes
    # and contiguous strides (products of the later sizes) in int64. With two dims or fewer the
    # one later size is bounded by max(shape), so _entry only calls this for more or for a huge one.
    if max(shape) > _INT64_MAX or math.prod(max(d, 1) for d in shape[1:]) > _INT64_MAX:
        raise HeaderError(f"{path}: tensor {name!r} (file bytes [{start}, {start})) has shape {list(shape)}: "
                          f"no element, but sizes whose products exceed int64 ({_INT64_MAX}), which torch "
                          f"cannot hold; {_FIX}")


def _refuse(path: pathlib.Path, name: str, entry: object, data_start: int) -> NoReturn:
    """Raise the HeaderError that says what is wrong with a header entry ``_entry`` refused."""
    where = f"{path}: tensor {name!r}"
    try:   # keys beyond these three are ignored, as safetensors does
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    except (TypeError, KeyError, IndexError):
        got = sorted(entry) if isinstance(entry, dict) else type(entry).__name__
        raise HeaderError(f"{where}: header entry must be an object with the keys {_ENTRY_KEYS}, "
                          f"got {got}; {_FIX}") from None
    if not isinstance(dtype, str) or dtype not in BITS:
        raise HeaderError(f"{where}: unknown dtype {dtype!r} (data_offsets {offsets!r}, data section "
                          f"at file byte {data_start}); known dtypes: {', '.join(BITS)}; convert the "
                          "tensor to one of them before saving")
    if type(shape) is not list or not all(type(d) is int and d >= 0 for d in shape):
        raise HeaderError(f"{where}: shape {shape!r} must be a list of non-negative integers; {_FIX}")
    if not (type(offsets) is list and len(offsets) == 2 and all(type(o) is int and o >= 0 for o in offsets)):
        raise HeaderError(f"{where}: data_offsets {offsets!r} must be two non-negative integers "
                          f"[begin, end]; {_FIX}")
    begin, end = offsets
    span = f"data_offsets [{begin}, {end}] (file bytes [{data_start + begin}, {data_start + end}))"
    if begin > end:
        raise HeaderError(f"{where}: {span} end before they begin; {_FIX}")
    try:
        need = nbytes_of(dtype, shape)
    except ValueError as e:   # F4 / F6 ending inside a byte: safetensors refuses it (MisalignedSlice)
        raise HeaderError(f"{where}: {e} ({BITS[dtype]} bits per element), at {span}; {_FIX}") from None
    if end - begin != need:
        raise HeaderError(f"{where}: {dtype} shape {shape} needs {need} bytes but {span} "
                          f"span {end - begin} bytes; {_FIX}")
    raise HeaderError(f"{where}: header entry {entry!r} refused; {_FIX}")   # not reached


def _check_layout(path: pathlib.Path, specs: list[TensorSpec], data_start: int, file_size: int) -> None:
    """Tensors sorted by start must tile the data section exactly: no hole, no overlap, no tail."""
    pos, prev = data_start, None
    for spec in specs:
        here = f"{path}: tensor {spec.name!r} at file bytes [{spec.start}, {spec.end})"
        if spec.start < pos:
            raise HeaderError(f"{here} overlaps tensor {prev.name!r} at file bytes [{prev.start}, "
                              f"{prev.end}); {_FIX}")
        if spec.start > pos:
            after = f"after tensor {prev.name!r}" if prev else "at the start of the data section"
            raise HeaderError(f"{here} leaves a hole of {spec.start - pos} bytes (file bytes [{pos}, "
                              f"{spec.start})) {after}; safetensors forbids unused bytes: {_FIX}")
        pos, prev = spec.end, spec
    if pos != file_size:
        bad = next((s for s in specs if s.end > file_size), None)
        last = f"tensor {prev.name!r}" if prev else "its header"
        what = (f"is truncated: tensor {bad.name!r} at file bytes [{bad.start}, {bad.end}) runs past its end"
                if bad else f"has {file_size - pos} trailing bytes after {last}")
        raise HeaderError(f"{path}: file {what}: expected size {pos} bytes, actual size {file_size} bytes "
                          f"(data section starts at byte {data_start}); {_FIX}")


def _not_safetensors(head: bytes, shown: str) -> str:
    return (f"{shown}: not a safetensors file: it starts with {head[:16]!r}, where a safetensors file "
            "starts with an 8-byte little-endian header length and a JSON header '{...}'; point at the "
            "checkpoint's .safetensors files")


def read_header(path: str | os.PathLike) -> Shard:
    """Parse and validate one safetensors file's header; reads only its first ``8 + header_len`` bytes.
    ``Shard.path`` keeps the name given (made absolute); ``Shard.real`` is the file it resolves to."""
    path = pathlib.Path(os.path.abspath(path))
    stat_shard(path)
    real = real_path(path)
    where = shown(path, real)
    with open(open_regular(real, where), "rb") as f:
        st = os.fstat(f.fileno())
        file_size = st.st_size
        cached = Cached.of(f.fileno(), file_size)   # before the header read brings pages in
        if file_size < 8:
            raise HeaderError(f"{where}: file is {file_size} bytes, too short for the 8-byte header length "
                              f"of a safetensors file; {_FIX}")
        header_len = int.from_bytes(f.read(8), "little")
        if header_len > MAX_HEADER_BYTES or 8 + header_len > file_size:
            if (head := os.pread(f.fileno(), 16, 0))[8:9] != b"{":
                raise HeaderError(_not_safetensors(head, where))
            if header_len > MAX_HEADER_BYTES:
                raise HeaderError(f"{where}: header length {header_len} (file bytes [0, 8)) exceeds the "
                                  f"{MAX_HEADER_BYTES}-byte limit; not a safetensors file, or corrupt")
            raise HeaderError(f"{where}: header would span file bytes [8, {8 + header_len}) but the file is "
                              f"only {file_size} bytes; truncated or not a safetensors file: {_FIX}")
        raw = f.read(header_len)
    if len(raw) != header_len:
        raise FileChangedError(f"{where}: file shrank while its header (file bytes [8, {8 + header_len})) "
                               f"was read; got {len(raw)} bytes")
    header, data_start = _parse_json(raw, path), 8 + header_len
    metadata = header.pop("__metadata__", None)
    metadata = {} if metadata is None else metadata  # null is how serde writes an absent map
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise HeaderError(f"{path}: __metadata__ must map strings to strings, got {metadata!r}; "
                          "store other values as JSON text")
    specs = sorted((_entry(path, name, entry, data_start) for name, entry in header.items()),
                   key=lambda s: (s.start, s.end, s.name))
    _check_layout(path, specs, data_start, file_size)
    return Shard(path, data_start, file_size, tuple(specs), metadata, real, identity(st), cached)
