"""How one tensor is cut into pieces, each fitting a ring slot (plan.py packs them into batches).

See plan.py's docstring for the rules: quantized matrices along their scale granules (bands,
granules, inside one granule: a *scale group*), kept tensors as byte runs; a TP rank's part of
a tensor as its bands and column range (tp_layout.py). Pure arithmetic on headers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

from .checkpoint import TensorSpec
from .fp8 import Scheme
from .tp_layout import bands, kept_segments

__all__ = ["Piece", "matrix_dims", "segments", "release_points"]


@dataclass(frozen=True)
class Piece:
    spec: TensorSpec
    lo: int                # absolute file bytes [lo, hi) spanned (every row, if strided)
    hi: int
    offset: int            # where the bytes land inside the slot
    quantize: bool
    expert: int = 0        # quantized: which [out, in] matrix (0 for rank 2)
    row0: int = 0          # quantized: rows [row0, row1), columns [col0, col1) of that matrix
    row1: int = 0
    col0: int = 0
    col1: int = 0
    stride: int = 0        # file bytes from one row of the piece to the next; 0: one range
    first: bool = True     # first / last piece of its tensor
    last: bool = True
    whole: bool = True     # quantized: the piece holds its whole matrix
    group: int = -1        # the scale group it shares with other pieces; -1: its scales are its own
    group_first: bool = False
    group_last: bool = False
    release_to: int = 0    # file bytes before this are not read again once this piece is
    at: int = 0            # kept: where the piece's bytes go in its (local) tensor's bytes

    @property
    def nbytes(self) -> int:
        """Bytes in the slot."""
        if not self.stride:
            return self.hi - self.lo
        return (self.row1 - self.row0) * (self.col1 - self.col0) * self.spec.itemsize

    def ranges(self) -> list[tuple[int, int]]:
        """The file byte ranges of the piece, in slot order."""
        if not self.stride:
            return [(self.lo, self.hi)]
        w = (self.col1 - self.col0) * self.spec.itemsize
        return [(a, a + w) for a in range(self.lo, self.hi, self.stride)]

def matrix_dims(shape: tuple[int, ...]) -> tuple[int, int, int]:
    """(experts, rows, cols) of a weight: rank 2 is one matrix; leading dims are experts."""
    return math.prod(shape[:-2]), shape[-2], shape[-1]


def _even(n: int, parts: int) -> list[tuple[int, int]]:
    """range(n) in ``parts`` spans whose sizes differ by at most one: no tiny remainder piece,
    so the pieces of consecutive rows pack into slots alike."""
    return [(n * k // parts, n * (k + 1) // parts) for k in range(parts)]


def _inside(r0: int, h: int, c0: int, w: int, cap: int) -> list[tuple[int, int, int, int]]:
    """Rectangles of at most ``cap`` elements cutting the h x w granule at (r0, c0), in order:
    runs of its rows while a row fits, else each row in equal parts."""
    if w <= cap:
        per = cap // w
        return [(r, min(r0 + h, r + per), c0, c0 + w) for r in range(r0, r0 + h, per)]
    return [(r, r + 1, c0 + a, c0 + b) for r in range(r0, r0 + h) for a, b in _even(w, -(-w // cap))]


def _rects(rows: int, cols: int, gr: int, gc: int, cap: int) -> Iterator[list[tuple[int, int, int, int]]]:
    """Lists of rectangles (row0, row1, col0, col1) covering a rows x cols matrix in order, each
    of at most ``cap`` >= 1 elements; a list of several shares one gr x gc granule."""
    if rows * cols <= cap:
        yield [(0, rows, 0, cols)]
        return
    if gr * cols <= cap:                 # 1. runs of whole bands
        per = cap // (gr * cols) * gr
        for r in range(0, rows, per):
            yield [(r, min(rows, r + per), 0, cols)]
        return
    nb = -(-cols // gc)
    for b0 in range(0, rows, gr):
        h = min(gr, rows - b0)
        if h * gc <= cap:                # 2. runs of whole granules of the band
            for a, b in _even(nb, -(-nb // (cap // (h * gc)))):
                yield [(b0, b0 + h, a * gc, min(cols, b * gc))]
        else:                            # 3. inside each granule of the band
            for c0 in range(0, cols, gc):
                yield _inside(b0, h, c0, min(gc, cols - c0), cap)


def _local_rects(bands, rows, cols, gr, gc, cap) -> Iterator[list[tuple[int, int, int, int]]]:
    """``_rects`` of a local matrix made of file bands (tp_layout.bands), no rectangle crossing
    a band: per band when granules do not span bands (channel; blocks, whose TP cuts fall on
    the grid), else (per-tensor: one granule) every band's pieces as one shared list."""
    if len(bands) == 1:
        yield from _rects(rows, cols, gr, gc, cap)
        return
    if gr < rows:
        for r0, _, n in bands:
            for rects in _rects(n, cols, gr, gc, cap):
                yield [(r0 + a, r0 + b, c, d) for a, b, c, d in rects]
        return
    yield [r for r0, _, n in bands for r in ([(r0, r0 + n, 0, cols)] if n * cols <= cap
                                             else _inside(r0, n, 0, cols, cap))]


def segments(spec: TensorSpec, quantize: bool, slot_bytes: int, scheme: Scheme, sl=None
              ) -> Iterator[tuple[int, int, dict]]:
    """(lo, hi, piece fields) per piece of one tensor (``sl``: this rank's TP slice of it), in
    plan order; ``gn`` > 1 pieces share one granule's scale (``gpos``: the piece's place among them)."""
    step = slot_bytes - slot_bytes % spec.itemsize   # whole torch elements: bytes for F4 / F6 / raw
    if not quantize and sl is not None:
        yield from kept_segments(spec, sl, step)
        return
    if not quantize:
        for lo in range(spec.start, max(spec.end, spec.start + 1), step):
            yield lo, min(lo + step, spec.end), {"at": lo - spec.start}
        return
    experts, rows, cols = matrix_dims(spec.shape)
    size, row_bytes = spec.itemsize, cols * spec.itemsize
    local, lrows, lcols, shift = bands(spec.shape, sl)
    gr, gc = scheme.granule(lrows, lcols)
    for e in range(experts):
        base = spec.start + e * rows * row_bytes
        for rects in _local_rects(local, lrows, lcols, gr, gc, slot_bytes // size):
            for k, (r0, r1, c0, c1) in enumerate(rects):
                f0 = r0 + _shift_of(local, r0)
                strided = r1 - r0 > 1 and c1 - c0 < cols
                yield base + f0 * row_bytes + (shift + c0) * size, \
                    base + (f0 + r1 - r0 - 1) * row_bytes + (shift + c1) * size, dict(
                    expert=e, row0=r0, row1=r1, col0=c0, col1=c1, stride=row_bytes if strided else 0,
                    whole=(r1 - r0, c1 - c0) == (lrows, lcols), gpos=k, gn=len(rects))


def _shift_of(local, r0: int) -> int:
    """File row minus local row for local row ``r0`` (its band's)."""
    for b0, f0, n in local:
        if b0 <= r0 < b0 + n:
            return f0 - b0
    return 0


def release_points(segs: list[tuple[int, int, dict]]) -> list[int]:
    """Per piece: the file offset below which no later piece of the tensor reads (pieces of
    a band cut into columns read behind each other's ends)."""
    out, nxt = [0] * len(segs), math.inf
    for i in range(len(segs) - 1, -1, -1):
        lo, hi, _ = segs[i]
        out[i], nxt = int(min(hi, nxt)), min(nxt, lo)
    return out
