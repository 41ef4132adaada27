"""Cut a checkpoint into slot-sized batches: pure arithmetic on headers, no I/O.

A *piece* is a byte range of one tensor that travels through one ring slot:
- a whole small tensor (several are packed into one slot),
- for a quantized tensor, a run of rows of one ``[out, in]`` matrix (rank-3 MoE weights
  are cut per expert), cut on block rows for block granularity so each piece quantizes
  independently and chunked results equal unchunked ones bit for bit,
- for a big unquantized tensor, a byte range (it is only copied).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

from .checkpoint import TensorSpec
from .errors import OptionsError

__all__ = ["split_run", "Piece", "Batch", "plan_batches", "matrix_dims", "per_tensor_split", "ALIGN"]

ALIGN = 64   # pieces start on 64-byte boundaries inside a slot (any dtype view is legal)


@dataclass(frozen=True)
class Piece:
    spec: TensorSpec
    lo: int                # absolute file byte range [lo, hi)
    hi: int
    offset: int            # where the bytes land inside the slot
    quantize: bool
    expert: int = 0        # quantized: which [out, in] matrix (0 for rank 2)
    row0: int = 0          # quantized: rows [row0, row1) of that matrix
    row1: int = 0
    first: bool = True     # first / last piece of its tensor
    last: bool = True
    whole: bool = True     # quantized: the piece holds its whole matrix

    @property
    def nbytes(self) -> int:
        return self.hi - self.lo


@dataclass(frozen=True)
class Batch:
    pieces: tuple[Piece, ...]

    @property
    def nbytes(self) -> int:
        """Slot bytes in use (up to the end of the last piece)."""
        last = self.pieces[-1]
        return last.offset + last.nbytes


def matrix_dims(shape: tuple[int, ...]) -> tuple[int, int, int]:
    """(experts, rows, cols) of a weight: rank 2 is one matrix; leading dims are experts."""
    return math.prod(shape[:-2]), shape[-2], shape[-1]


def _segments(spec: TensorSpec, quantize: bool, slot_bytes: int, block_rows: int
              ) -> Iterator[tuple[int, int, dict]]:
    """(lo, hi, piece fields) per piece of one tensor, in file order."""
    if not quantize:
        step = slot_bytes - slot_bytes % spec.itemsize   # whole torch elements: bytes for F4 / F6 / raw
        for lo in range(spec.start, max(spec.end, spec.start + 1), step):
            yield lo, min(lo + step, spec.end), {}
        return
    experts, rows, cols = matrix_dims(spec.shape)
    row_bytes = cols * spec.itemsize
    per = slot_bytes // row_bytes if rows * row_bytes > slot_bytes else rows
    per -= per % block_rows if per < rows else 0
    if per <= 0:
        need = block_rows * row_bytes
        raise OptionsError(
            f"{spec.shard}: tensor {spec.name!r} (bytes {spec.start}..{spec.end}) needs at least "
            f"{need} bytes per ring slot ({block_rows} row(s) of {row_bytes} bytes), but "
            f"slots are {slot_bytes} bytes; raise ring_bytes to at least {4 * need}")
    for e in range(experts):
        base = spec.start + e * rows * row_bytes
        for r0 in range(0, rows, per):
            r1 = min(rows, r0 + per)
            yield base + r0 * row_bytes, base + r1 * row_bytes, dict(
                expert=e, row0=r0, row1=r1, whole=(r0 == 0 and r1 == rows))


def plan_batches(tensors: Iterable[TensorSpec], quantize: Callable[[TensorSpec], bool],
                 slot_bytes: int, block_rows: int = 1) -> list[Batch]:
    """Batches in file order; each fits one slot of ``slot_bytes``.

    Raises ``OptionsError`` up front if a quantized tensor cannot be cut to fit a slot.
    """
    batches: list[Batch] = []
    current: list[Piece] = []
    used = 0
    for spec in tensors:
        q = quantize(spec)
        segs = list(_segments(spec, q, slot_bytes, block_rows))
        for i, (lo, hi, extra) in enumerate(segs):
            offset = -(-used // ALIGN) * ALIGN
            if current and offset + (hi - lo) > slot_bytes:
                batches.append(Batch(tuple(current)))
                current, offset = [], 0
            current.append(Piece(spec, lo, hi, offset, q, first=(i == 0),
                                 last=(i == len(segs) - 1), **extra))
            used = offset + (hi - lo)
    if current:
        batches.append(Batch(tuple(current)))
    return batches


def per_tensor_split(batches: list[Batch], n_slots: int, copies: bool) -> tuple[set[tuple[str, int]], int]:
    """For per-tensor scales: (matrices whose amax the reader pre-passes, hold buffer bytes).

    A matrix cut into pieces needs its whole amax before the first cast. A copying mover
    (CUDA) holds every such matrix in one device buffer (the largest of them, 64-byte
    rounded); in place (CPU) a matrix is held in its ring slots when it spans fewer batches
    than the ring has slots, and the bigger ones are pre-passed.
    """
    spans: dict[tuple[str, int], int] = {}
    sizes: dict[tuple[str, int], int] = {}
    for batch in batches:
        for p in batch.pieces:
            if p.quantize and not p.whole:
                key = (p.spec.name, p.expert)
                spans[key] = spans.get(key, 0) + 1
                _, rows, cols = matrix_dims(p.spec.shape)
                sizes[key] = rows * cols * p.spec.itemsize
    if copies:
        return set(), -(-max(sizes.values(), default=0) // 64) * 64
    return {k for k, n in spans.items() if n > n_slots - 1}, 0


def split_run(lo: int, sizes: list[int], parts: int, min_bytes: int = 1 << 20,
              align: int = 4096) -> list[tuple[int, list[tuple[int, int, int]]]]:
    """Cut a file-contiguous run (destinations of ``sizes`` bytes, back to back from file
    offset ``lo``) into at most ``parts`` shares of about equal bytes, each >= ``min_bytes``
    and cut at ``align``-ed file offsets, for parallel copies:
    ``[(file offset, [(destination index, start, end), ...]), ...]``."""
    total = sum(sizes)
    n = max(1, min(parts, total // max(1, min_bytes)))
    step = -(-total // n)
    cuts = [0]
    for k in range(1, n):
        c = -(-(lo + k * step) // align) * align - lo
        if cuts[-1] < c < total:
            cuts.append(c)
    cuts.append(total)
    shares = []
    for a, b in zip(cuts, cuts[1:]):
        segs, pos = [], 0
        for i, size in enumerate(sizes):
            s, e = max(a, pos), min(b, pos + size)
            if s < e:
                segs.append((i, s - pos, e - pos))
            pos += size
        shares.append((lo + a, segs))
    return shares
