"""The bytes and scales of a tensor-parallel slice (tp.py says which rows / columns a rank holds):
the file byte ranges rank ``sl`` reads (one contiguous range per part for a column slice, a strided
run per row for a row slice), the rank's part of a TP=1 scale grid, and the slice applied to a
tensor. Pure arithmetic; ``itemsize`` in bytes.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from ._math import as_int, ceil_div
from .errors import OptionsError, TPError
from .tp import Slice, block_of, cut, where

__all__ = ["Strided", "strided_ranges", "byte_ranges", "scale_slice", "take"]


class Strided(NamedTuple):
    """``count`` runs of ``length`` bytes, ``stride`` bytes apart, the first at ``first_lo``."""
    first_lo: int
    length: int
    stride: int
    count: int


def _layout(shape, itemsize, sl: Slice):
    """(outer count, bytes per index along sl.dim, bytes per outer step, ranges) of a C-order
    tensor; a replicated slice is one run of the whole tensor."""
    if tuple(shape) != sl.full_shape:
        raise TPError(f"{where(sl.name, shape)}: the slice was cut from shape {list(sl.full_shape)}")
    if (as_int(itemsize) or 0) < 1:
        raise OptionsError(f"itemsize must be a positive int of bytes, got {itemsize!r} ({sl.name!r})")
    if sl.dim is None:
        whole = math.prod(sl.full_shape) * itemsize
        return 1, whole, whole, ((0, 1),)
    inner = math.prod(shape[sl.dim + 1:]) * itemsize
    return math.prod(shape[:sl.dim]), inner, shape[sl.dim] * inner, sl.ranges


def strided_ranges(spec_start: int, shape, itemsize: int, sl: Slice) -> list[Strided]:
    """The file bytes of ``sl`` as one :class:`Strided` per logical part (``spec_start``: the
    tensor's first byte): ``count == 1`` for a column slice of a matrix, a run per row for a row
    slice. The rank's tensor is, for k in range(count), run k of every part in part order."""
    outer, inner, stride, ranges = _layout(shape, itemsize, sl)
    return [Strided(spec_start + lo * inner, (hi - lo) * inner, stride, outer) for lo, hi in ranges]


def byte_ranges(spec_start: int, shape, itemsize: int, sl: Slice) -> list[tuple[int, int]]:
    """File byte ranges ``[lo, hi)`` rank ``sl`` reads, in the order its tensor lays them out
    (adjacent ranges merged): one per part for a column slice, one per row for a row slice.
    ``itemsize`` in bytes (sub-byte dtypes such as F4 are not sharded)."""
    outer, inner, stride, ranges = _layout(shape, itemsize, sl)
    out: list[tuple[int, int]] = []
    for o in range(outer):
        base = spec_start + o * stride
        for lo, hi in ranges:
            a, b = base + lo * inner, base + hi * inner
            if out and out[-1][1] == a:
                out[-1] = (out[-1][0], b)
            elif b > a:
                out.append((a, b))
    return out


def scale_slice(sl: Slice, scale_shape, *, block=None) -> Slice:
    """The rank's part of the TP=1 scale grid of the weight ``sl`` was cut from: per-tensor
    (``[]``, ``[1]``, ``[E, 1, 1]``) and a per-channel ``[out, 1]`` under a row split are
    replicated; a per-channel scale follows a column split row for row; a block grid
    ``[ceil(out/br), ceil(in/bc)]`` (``block=(br, bc)``) is cut at ``lo // b`` .. ``ceil(hi / b)``.
    TPError when the scale does not fit the weight or a boundary is off the block grid."""
    scale_shape, block = tuple(int(d) for d in scale_shape), block_of(block, sl.name)
    replicated = Slice(sl.name, scale_shape, None, (), scale_shape)
    if sl.dim is None or math.prod(scale_shape) == 1:
        return replicated
    d, n = sl.dim, sl.full_shape[sl.dim]
    if len(scale_shape) != len(sl.full_shape):
        raise TPError(f"{where(sl.name, sl.full_shape)}: a scale of shape {list(scale_shape)} is no grid of it")
    g = scale_shape[d]
    if g == 1:
        return replicated
    if g == n:
        ranges = sl.ranges
    else:
        b = None if block is None else block[0] if d == len(scale_shape) - 2 else block[1]
        if b is None or g != ceil_div(n, b):
            raise TPError(f"{where(sl.name, sl.full_shape, d)}: scale of shape {list(scale_shape)} is no "
                          f"per-channel or {block} block grid of it; pass the block=(br, bc) it was made with")
        if any(lo % b or (hi % b and hi != n) for lo, hi in sl.ranges):
            raise TPError(f"{where(sl.name, sl.full_shape, d)}: ranges {list(sl.ranges)} are off the "
                          f"{b}-wide block grid; cut the weight with shard_of(..., block={block})")
        ranges = tuple((lo // b, ceil_div(hi, b)) for lo, hi in sl.ranges)
    return cut(sl.name, scale_shape, d, ranges)


def take(t: torch.Tensor, sl: Slice) -> torch.Tensor:
    """``sl`` applied to the full tensor ``t`` (a weight or its scale grid): the rank's tensor,
    its parts concatenated along ``sl.dim`` (``t`` itself when replicated)."""
    if tuple(t.shape) != sl.full_shape:
        raise TPError(f"{where(sl.name, tuple(t.shape))}: the slice was cut from shape {list(sl.full_shape)}")
    if sl.dim is None:
        return t
    return torch.cat([t.narrow(sl.dim, lo, hi - lo) for lo, hi in sl.ranges], dim=sl.dim)
