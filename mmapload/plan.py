"""Cut a checkpoint into slot-sized batches: pure arithmetic on headers, no I/O.

A *piece* is what travels through one ring slot:
- a whole small tensor (several are packed into one slot),
- for a big unquantized tensor, a byte range (it is only copied),
- for a quantized tensor, a rectangle ``[row0, row1) x [col0, col1)`` of one ``[out, in]``
  matrix (rank-3 MoE weights are cut per expert), its rows back to back in the slot. It is
  one file range when it has whole rows or one row, else one range per row (``stride``).

Quantized matrices are cut along their scale granules (``fp8.granule``: the matrix for
per-tensor scales, a row per channel, ``block_size`` per block), so that a piece quantizes
on its own and chunked results equal unchunked ones bit for bit. In order of preference:
1. runs of whole bands (a granule's rows, full width): file-contiguous;
2. where one band is more than a slot, runs of whole granules of it (block scales);
3. where one granule is more than a slot, pieces inside it: runs of its rows, or parts of
   one row. Such pieces share the granule's scale: they form a *scale group* (``group``),
   consecutive in plan order, whose amax must be complete before the first of them is cast
   (assemble.py: held until the last lands, or pre-passed by the reader). A shared group is
   always exactly one granule, so its amax is one number.
There is no row-width limit: a slot needs room for one element.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Callable, Iterable, Mapping

import torch

from . import transfer
from .checkpoint import TensorSpec
from .fp8 import Granularity, as_scheme
from .pieces import Piece, matrix_dims, release_points, segments
from .prequantized import fp8_pairs
from .tp import Slice
from .tp_layout import experts_in_out, heads_of, rank_slices, warn_unmatched

if TYPE_CHECKING:
    from .checkpoint import Checkpoint
    from .config import LoadOptions

__all__ = ["Piece", "Batch", "plan_batches", "matrix_dims", "runs", "scale_groups", "split_groups",
           "LoadPlan", "plan_load", "ALIGN"]

ALIGN = 64   # pieces start on 64-byte boundaries inside a slot (any dtype view is legal)


@dataclass(frozen=True)
class Batch:
    pieces: tuple[Piece, ...]

    @property
    def nbytes(self) -> int:
        """Slot bytes in use (up to the end of the last piece)."""
        last = self.pieces[-1]
        return last.offset + last.nbytes


def plan_batches(tensors: Iterable[TensorSpec], quantize: Callable[[TensorSpec], bool],
                 slot_bytes: int, granularity: Granularity | str = Granularity.TENSOR,
                 block_size: tuple[int, int] = (128, 128), slices: Mapping[str, Slice] | None = None
                 ) -> list[Batch]:
    """Batches in file order; each fits one slot of ``slot_bytes``; quantized tensors are cut
    along the granules of ``granularity`` (see the module docstring). ``slices``: this rank's
    TP slice of each sharded tensor (tp_layout.rank_slices): only its bytes are planned."""
    scheme = as_scheme(granularity, block_size)   # parsed once, not per tensor
    batches: list[Batch] = []
    current: list[Piece] = []
    used = groups = 0
    for spec in tensors:
        q = quantize(spec)
        segs = list(segments(spec, q, slot_bytes, scheme, slices.get(spec.name) if slices else None))
        for i, ((lo, hi, extra), rel) in enumerate(zip(segs, release_points(segs))):
            gpos, gn = extra.pop("gpos", 0), extra.pop("gn", 1)
            if gn > 1:
                groups += gpos == 0
                extra.update(group=groups - 1, group_first=gpos == 0, group_last=gpos == gn - 1)
            nbytes = ((extra["row1"] - extra["row0"]) * (extra["col1"] - extra["col0"]) * spec.itemsize
                      if extra.get("stride") else hi - lo)   # Piece.nbytes, before the piece exists
            offset = -(-used // ALIGN) * ALIGN
            if current and offset + nbytes > slot_bytes:
                batches.append(Batch(tuple(current)))
                current, offset = [], 0
            current.append(Piece(spec, lo, hi, offset, q, first=(i == 0), last=(i == len(segs) - 1),
                                 release_to=rel, **extra))
            used = offset + nbytes
    if current:
        batches.append(Batch(tuple(current)))
    return batches


def runs(pieces: tuple[Piece, ...]) -> list[tuple[int, int]]:
    """[start, end) index ranges of ``pieces`` whose file bytes follow each other: one read
    each. A strided piece is a run of its own."""
    out, start = [], 0
    for end in range(1, len(pieces) + 1):
        a, b = pieces[end - 1], pieces[end] if end < len(pieces) else None
        if b is None or a.stride or b.stride or b.spec.shard != a.spec.shard or b.lo != a.hi:
            out.append((start, end))
            start = end
    return out


def scale_groups(batches: Iterable[Batch]) -> dict[int, list[Piece]]:
    """The pieces of every shared scale group, in plan order."""
    groups: dict[int, list[Piece]] = {}
    for batch in batches:
        for p in batch.pieces:
            if p.group >= 0:
                groups.setdefault(p.group, []).append(p)
    return groups


def split_groups(batches: Iterable[Batch], n_slots: int, copies: bool) -> tuple[set[int], int]:
    """How shared scale groups wait for their amax: (groups the reader pre-passes, hold
    buffer bytes).

    A copying mover (CUDA) holds every group in one device buffer (the largest group,
    64-byte rounded). In place (CPU) a group is held in its ring slots when it spans fewer
    batches than the ring has slots; the reader pre-passes the bigger ones from the map.
    """
    spans: dict[int, int] = {}
    sizes: dict[int, int] = {}
    for batch in batches:
        for g in {p.group for p in batch.pieces if p.group >= 0}:
            spans[g] = spans.get(g, 0) + 1
        for p in batch.pieces:
            if p.group >= 0:
                sizes[p.group] = sizes.get(p.group, 0) + p.nbytes
    if copies:
        return set(), -(-max(sizes.values(), default=0) // 64) * 64
    return {g for g, n in spans.items() if n > n_slots - 1}, 0


@dataclass(frozen=True)
class LoadPlan:
    """Everything a load decides before it reads a byte, worked out once (``plan_load``) and
    read by the load (pipeline.py) and by ``estimate``. Bytes are slot / device bytes."""

    batches: tuple[Batch, ...]                   # in file order, each fits one slot
    groups: Mapping[int, tuple[Piece, ...]]      # shared scale group -> its pieces, plan order
    prepass: frozenset[int]                      # groups whose amax the reader pre-passes
    hold_bytes: int                              # copying mover's hold buffer (largest group)
    copies: bool                                 # the mover copies pieces off their slots (CUDA)
    stage_bytes: int                             # the largest batch (a staging buffer's size)
    n_slots: int
    slot_bytes: int
    slices: Mapping[str, Slice] = field(default_factory=lambda: MappingProxyType({}))   # TP: this
    # rank's slice of each sharded tensor (replicated ones absent)
    tp_rank: int = 0
    tp_size: int = 1

    def shape_of(self, spec: TensorSpec) -> tuple[int, ...]:
        """The header shape of what this rank loads of ``spec`` (its TP slice, or all of it)."""
        sl = self.slices.get(spec.name)
        return spec.shape if sl is None else sl.shape

    @property
    def total_bytes(self) -> int:
        """File bytes this load reads (a TP rank: its share plus the replicated tensors)."""
        return sum(p.nbytes for b in self.batches for p in b.pieces)

    @property
    def held(self) -> frozenset[int]:
        """Groups held until their last piece lands: every group not pre-passed."""
        return frozenset(self.groups.keys() - self.prepass)

    @property
    def into_outputs(self) -> bool:
        """Kept tensors are read straight into their outputs: in place, when the mover does not copy."""
        return not self.copies


def plan_load(ckpt: "Checkpoint", policy: Callable[[TensorSpec], bool], config: "LoadOptions",
              device: torch.device, tp_rank: int | None = None) -> LoadPlan:
    """The plan of loading ``ckpt`` onto ``device`` (which need not exist here): pure arithmetic
    on headers. ``policy(spec)``: quantize that tensor (``policy.config``: config.json, for the
    heads TP cuts by). ``tp_rank``: the rank planned when ``config.tp_size > 1`` (default
    ``config.tp_rank`` or 0). Raises what ``plan_batches`` and ``tp_layout.rank_slices`` raise.

    Per shared scale group, one mode: a copying mover (CUDA) holds every group in its device
    buffer; in place (CPU) a group is held in its ring slots when it spans fewer batches than
    the ring has slots, else pre-passed. In place the slot is no stop on the way for a kept
    tensor either: the reader reads it straight into its output (one copy instead of two).
    """
    rank = (config.tp_rank or 0) if tp_rank is None else tp_rank
    slices = {}
    if config.tp_size > 1:
        cfg = getattr(policy, "config", None)
        warn_unmatched(config.tp_plan, (s.name for s in ckpt.tensors))
        slices = rank_slices(ckpt.tensors, policy, config.scheme, rank, config.tp_size, plan=config.tp_plan,
                             heads=heads_of(cfg), pairs=fp8_pairs(ckpt, cfg, config.source_block),
                             in_out=experts_in_out(cfg))
    batches = tuple(plan_batches(ckpt.tensors, policy, config.slot_bytes, config.scheme,
                                 config.block_size, slices))
    copying = transfer.copies(device)
    groups = {g: tuple(ps) for g, ps in scale_groups(batches).items()}
    # No more slots than the load can use (every batch in flight, plus one): a ring_bytes far above
    # the checkpoint allocates only what it needs. Held / pre-passed stays the same: a group spans
    # at most len(batches) batches, fewer than either slot count.
    n_slots = min(config.n_slots, max(2, len(batches) + 1))
    prepass, hold_bytes = split_groups(batches, n_slots, copying)
    return LoadPlan(
        batches=batches, groups=MappingProxyType(groups), prepass=frozenset(prepass),
        hold_bytes=hold_bytes, copies=copying,
        stage_bytes=max((b.nbytes for b in batches), default=0), n_slots=n_slots,
        slot_bytes=config.slot_bytes, slices=MappingProxyType(slices), tp_rank=rank, tp_size=config.tp_size)
