"""The reader thread's work per batch: read its pieces into a ring slot, after pre-passing
the amax of the scale groups the plan marks for it (``LoadPlan.prepass``).

``Filler`` is the ``fill`` of ``ring.staged``: it runs on the reader thread only, and owns
the read-ahead and release-behind of the shards, which keep resident memory bounded.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .dtypes import torch_shape
from .fp8 import Granularity, Quantizer, merge_amax
from .readers import ShardReader
from .plan import Batch, LoadPlan, Piece, runs
from .result import OutFor, provided_output
from .ring import CopyPool

__all__ = ["Filler", "Prepared", "split_run"]


def _finished_ranges(p: Piece) -> list[tuple[int, int]]:
    """File ranges nothing reads again once ``p`` is read, for a piece read out of file order
    (a band cut into columns): each of its rows from column 0, as the pieces before it in
    the plan covered the columns to its left. Releasing whole rows from their start also
    frees the pages that two pieces' ranges share."""
    left = p.col0 * p.spec.itemsize
    return [(lo - left, hi) for lo, hi in p.ranges()]


@dataclass(frozen=True)
class Prepared:
    """What the reader prepared for a batch besides its slot bytes, by piece index."""

    amax: dict[int, torch.Tensor] = field(default_factory=dict)     # float32 scalar: the pre-passed
                                                                    # amax of the group a piece opens
    outputs: dict[int, torch.Tensor] = field(default_factory=dict)  # the output a kept piece was
                                                                    # read into (plan.into_outputs)
    views: dict[int, torch.Tensor] = field(default_factory=dict)    # io="view": a piece's bytes in
                                                                    # the map (uint8, no copy)


class Filler:
    """``filler(batch, slot)`` reads one batch into ``slot`` and returns its ``Prepared``.
    Reader thread only (after construction)."""

    def __init__(self, shards: dict[Path, ShardReader], plan: LoadPlan, device: torch.device,
                 pool: CopyPool, sample: Callable[[], None], out_for: OutFor | None = None,
                 views: bool = False):
        self.shards, self.slot_bytes, self.device, self.pool = shards, plan.slot_bytes, device, pool
        self.out_for = out_for   # the caller's tensors that kept tensors are read into, where it has them
        # io="view": pieces are handed on as views of the map (populated here, never copied);
        # their pages are released when their slot comes back, i.e. once the consumer is done with them
        self.views = views
        self._viewed: dict[int, list[Callable[[], None]]] = {}   # slot address -> its batch's releases
        self.plan = plan
        # TP: other ranks read the bytes between ours; read ahead and release exactly our pieces
        self.exact = plan.tp_size > 1
        self._batch = 0
        self.prepass = {g: plan.groups[g] for g in plan.prepass}
        self.into_outputs, self.sample = plan.into_outputs, sample
        self.prefetched: dict[ShardReader, int] = {}
        self._out: torch.Tensor | None = None   # the unquantized output being filled
        # the reader thread's own (quantizers are not thread-safe); a shared group is one
        # granule, so its amax is one number whatever the load's granularity
        self.quantizer = Quantizer(granularity=Granularity.TENSOR, device="cpu")

    def group_amax(self, pieces: tuple[Piece, ...] | list[Piece], scratch: np.ndarray) -> torch.Tensor:
        """The amax of one scale group too big to hold, read before any of it is cast.

        Piece by piece (each fits the still-free slot): zero-copy from a map, through the
        slot otherwise. Each piece is then dropped from our RSS but not from the page cache,
        so the copy pass that follows is a warm read, and host memory stays bounded.
        """
        amax = None
        for p in pieces:
            shard = self.shards[p.spec.shard]
            if p.stride:
                raw = torch.from_numpy(self._read_strided(shard, p, scratch[:p.nbytes]))
            else:
                raw = shard.window(p.lo, p.hi, scratch)
            if raw.data_ptr() % 64:
                raw = raw.clone()  # an unaligned map offset: typed views need alignment
            x = raw.view(p.spec.torch_dtype).view(p.row1 - p.row0, p.col1 - p.col0)
            part = self.quantizer.amax_2d(x)
            amax = part if amax is None else merge_amax(amax, part)
            del x, raw
            for lo, hi in _finished_ranges(p):
                shard.release(lo, hi, drop_cache=False)
        return amax

    def _output(self, piece: Piece) -> torch.Tensor | None:
        """The output an unquantized piece is read into (allocated at its first piece); None
        if that allocation failed: the consumer allocates again and reports it in order."""
        if piece.first:
            spec = piece.spec
            shape = torch_shape(spec.dtype, self.plan.shape_of(spec))
            self._out = provided_output(self.out_for, spec.name, shape, spec.torch_dtype, self.device)
            try:
                if self._out is None:
                    self._out = torch.empty(shape, dtype=spec.torch_dtype, device=self.device)
            except RuntimeError:
                self._out = None
        return self._out

    @staticmethod
    def _dest(piece: Piece, slot_np: np.ndarray, out: torch.Tensor | None) -> np.ndarray:
        if out is None:
            return slot_np[piece.offset:piece.offset + piece.nbytes]
        return out.reshape(-1).view(torch.uint8).numpy()[piece.at:piece.at + piece.nbytes]

    def _copy(self, shard: ShardReader, lo: int, dsts: list[np.ndarray]) -> None:
        """One file-contiguous run into its destinations, split over the copy pool's threads."""
        if self.pool.n == 1 or not shard.concurrent_copies:
            shard.copy_ranges(lo, dsts)
            return
        shares = split_run(lo, [len(d) for d in dsts], self.pool.n)
        self.pool.run([partial(shard.copy_ranges, at, [dsts[i][a:b] for i, a, b in segs])
                       for at, segs in shares])

    @staticmethod
    def _read_strided(shard: ShardReader, piece: Piece, dst: np.ndarray) -> np.ndarray:
        """A piece with one file range per row, its rows back to back in ``dst`` (a map's reader
        drops the pages its copies faulted in itself: MappedShard.copy_strided)."""
        shard.copy_strided(piece.lo, piece.stride, (piece.col1 - piece.col0) * piece.spec.itemsize, dst)
        return dst

    def _prefetch(self, shard: ShardReader, at: int) -> None:
        ahead = self.prefetched.get(shard, 0)
        if at + 2 * self.slot_bytes > ahead:   # keep ~2-4 slots of read-ahead going
            shard.prefetch(max(at, ahead), at + 4 * self.slot_bytes)
            self.prefetched[shard] = at + 4 * self.slot_bytes

    def _prefetch_next(self) -> None:
        """TP: ask for the next batch's own ranges (a window ahead would read other ranks' bytes).
        Strided pieces are left to their reads: a row each, too many to advise one by one."""
        self._batch += 1
        if self._batch < len(self.plan.batches):
            for p in self.plan.batches[self._batch].pieces:
                if not p.stride and p.hi > p.lo:
                    self.shards[p.spec.shard].prefetch(p.lo, p.hi)

    def release_views(self, slot: int | None = None) -> None:
        """Release the pages of the batch viewed in ``slot`` (an address; None: every slot's), which
        the consumer is done with: its slot came back, or the load ended."""
        for key in [slot] if slot is not None else list(self._viewed):
            for release in self._viewed.pop(key, ()):
                release()

    def drop_ahead(self) -> None:
        """After the reader thread was joined: what was read ahead of a load that stopped early
        leaves the page cache too (TP: no; the other ranks may still read those pages)."""
        if not self.exact:   # to the file's end: the kernel's own read-ahead goes past what we advised
            for shard in self.prefetched:
                shard.drop_unreleased(shard.size)

    def _release_run(self, shard: ShardReader, run: tuple[Piece, ...] | list[Piece]) -> None:
        for p in run:
            if p.release_to < p.hi:
                for lo, hi in _finished_ranges(p):
                    shard.release(lo, hi)
        shard.release_behind(run[-1].release_to)

    def _view_run(self, shard: ShardReader, run, start: int, slot_np: np.ndarray, views: dict) -> None:
        """io="view": fault in, with one call, what of the run the page cache lacked (the file's size is
        checked first: truncated before, a FileChangedError; after, a SIGBUS: the mode's caveat) and
        hand its pieces on as views of the map. The consumer reads
        them where they lie: it quantizes them, or copies a kept one into its output with torch's
        threads (a copy here, on this one thread, left the consumer waiting for a whole embedding)."""
        shard.populate(run[0].lo, run[-1].hi, uncached_only=True)
        for i, p in enumerate(run, start):
            if not p.quantize or p.lo % p.spec.itemsize == 0:   # a misaligned weight (odd header) is copied
                views[i] = shard.tensor(p.lo, p.hi)
            else:
                self._copy(shard, p.lo, [self._dest(p, slot_np, None)])

    def __call__(self, batch: Batch, slot: torch.Tensor) -> Prepared:
        slot_np = slot.numpy()
        pieces = batch.pieces
        if self.views:   # the slot is back: the consumer is done with what was viewed for it
            self.release_views(slot.data_ptr())
        views: dict[int, torch.Tensor] = {}
        # pre-passes first: a syscall reader uses the (still empty) slot as its window
        amax = {i: self.group_amax(self.prepass[p.group], slot_np)
                for i, p in enumerate(pieces) if p.group_first and p.group in self.prepass}
        outputs = {}
        if self.into_outputs and not self.views:   # io="view": the consumer copies them off the map
            outputs = {i: self._output(p) for i, p in enumerate(pieces) if not p.quantize}
        if self.exact:
            self._prefetch_next()
        for start, end in runs(pieces):            # one read per file-contiguous run
            run = pieces[start:end]
            shard = self.shards[run[0].spec.shard]
            if not self.exact:
                self._prefetch(shard, run[-1].release_to)
            if self.views and not any(p.stride for p in run):
                self._view_run(shard, run, start, slot_np, views)
                self.sample()
                self._viewed.setdefault(slot.data_ptr(), []).append(partial(self._release_run, shard, run))
                continue
            dsts = [self._dest(p, slot_np, outputs.get(i))
                    for i, p in enumerate(run, start)]
            if run[0].stride:
                self._read_strided(shard, run[0], dsts[0])
            else:
                self._copy(shard, run[0].lo, dsts)
            self.sample()
            if self.exact:   # our slices' pages from the page cache (a replicated tensor's, which
                for p in run:  # every rank reads, stay for the others); what we faulted in from our RSS
                    if p.spec.name in self.plan.slices:
                        for lo, hi in p.ranges():
                            shard.release(lo, hi)
                if not run[0].stride:   # a strided run's reader forgot its pages already
                    shard.forget(run[0].lo, run[-1].hi)
                continue
            self._release_run(shard, run)
        # the file read is the file validated: a shard rewritten in place (its mtime moved) while
        # this batch was read fails here, before any of the batch is handed on
        for path in dict.fromkeys(p.spec.shard for p in pieces):
            self.shards[path].verify()
        return Prepared(amax, {i: x for i, x in outputs.items() if x is not None}, views)


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
