"""Wire the stages: checkpoint -> mapped shards -> ring -> device quantizer -> results.

``iter_quantized`` yields ``(name, tensor)`` in file order; ``stream_quantize`` keeps them
in a ``QuantizedModel``. A reader thread (ring.py) fills slots from the maps while this
module's consumer moves each slot to the device, quantizes its pieces and retains only
the FP8 data and scales. No view into a ring slot ever reaches the caller.
"""

from __future__ import annotations

import os
import time
from functools import partial
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from . import device as _device
from . import profile as _profile
from ._procmem import read_mem
from ._progress import Progress
from .assemble import Assembler, Loaded
from .checkpoint import Checkpoint, open_checkpoint
from .device import resolve_device
from .errors import DeviceError, OptionsError
from .fp8 import Granularity, Quantizer, merge_amax
from .mapped import ShardReader
from .options import LoadOptions, should_quantize
from .pairs import fp8_pairs, paired
from .pread import open_reader
from .plan import Batch, Piece, matrix_dims, per_tensor_split, plan_batches, split_run
from .result import LoadReport, QuantizedModel, flat as _flatten
from .ring import CopyPool, Ring, StageTimes, staged

__all__ = ["stream_quantize", "iter_quantized"]


class _Pipeline:
    def __init__(self, ckpt: Checkpoint, device: torch.device, opts: LoadOptions):
        self.ckpt, self.device, self.opts = ckpt, device, opts
        gran = opts.granularity
        self.block_rows = opts.block_size[0] if gran is Granularity.BLOCK else 1
        self.batches = plan_batches(ckpt.tensors, lambda s: should_quantize(s, opts),
                                    opts.slot_bytes, self.block_rows)   # raises before any I/O
        self.report = LoadReport(path=str(ckpt.root), device=str(device), ring_bytes=opts.ring_bytes,
                                 slot_bytes=opts.slot_bytes)
        self.times = StageTimes()
        self._peak = [0, 0, 0]   # rss, anon, file
        self._tq = 0.0           # consumer seconds (quantize + copies out of the slots)
        self.prepass, self.hold_bytes = self._choose_per_tensor_mode()
        # In place (CPU) the slot is no stop on the way for a tensor kept as it is: the reader
        # reads it straight into its output, one copy instead of two, and the output's first-touch
        # page faults land on the reader thread (which waits for slots anyway), not the consumer.
        self._into_outputs = not _device.mover_class(device).copies
        self._out: torch.Tensor | None = None   # reader: the unquantized output being filled

    def _choose_per_tensor_mode(self) -> tuple[set[tuple[str, int]], int]:
        """Per-tensor scales of chunked matrices: hold them, or pre-pass (plan.per_tensor_split)."""
        if self.opts.granularity is not Granularity.TENSOR:
            return set(), 0
        return per_tensor_split(self.batches, self.opts.n_slots, _device.mover_class(self.device).copies)

    # -- reader thread -----------------------------------------------------------------
    def _sample(self) -> None:
        m = read_mem()
        p = self._peak
        p[0] = max(p[0], m.rss)
        p[1] = max(p[1], m.anon or 0)
        p[2] = max(p[2], m.file or 0)

    def _prepass_amax(self, shard: ShardReader, piece: Piece, scratch: np.ndarray) -> torch.Tensor:
        """Per-tensor amax of a matrix too big for one slot, read straight from the map.

        The cast of the first chunk needs the amax of all of them. Reading the file in
        slot-sized windows (zero-copy from a map; into the still-free slot otherwise) and
        dropping each window from our RSS, but not from the page cache, so the copy pass
        that follows is a warm read, keeps host memory bounded.
        """
        spec = piece.spec
        _, rows, cols = matrix_dims(spec.shape)
        row_bytes = cols * spec.itemsize
        lo = piece.lo - piece.row0 * row_bytes
        hi = lo + rows * row_bytes
        step = max(row_bytes, self.opts.slot_bytes - self.opts.slot_bytes % row_bytes)
        amax = None
        for w0 in range(lo, hi, step):
            w1 = min(hi, w0 + step)
            raw = shard.window(w0, w1, scratch)
            if raw.data_ptr() % 64:
                raw = raw.clone()  # an unaligned map offset: typed views need alignment
            x = raw.view(spec.torch_dtype).view(-1, cols)
            part = self._prepass_quantizer.amax_2d(x)
            amax = part if amax is None else merge_amax(amax, part)
            del x, raw
            shard.release(w0, w1, drop_cache=False)
        return amax

    def _output(self, piece: Piece) -> torch.Tensor | None:
        """The output an unquantized piece is read into (allocated at its first piece); None
        if that allocation failed: the consumer allocates again and reports it in order."""
        if piece.first:
            try:
                self._out = torch.empty(piece.spec.torch_shape, dtype=piece.spec.torch_dtype,
                                        device=self.device)
            except RuntimeError:
                self._out = None
        return self._out

    def _dest(self, piece: Piece, slot_np: np.ndarray, out: torch.Tensor | None) -> np.ndarray:
        if out is None:
            return slot_np[piece.offset:piece.offset + piece.nbytes]
        o = piece.lo - piece.spec.start
        return out.reshape(-1).view(torch.uint8).numpy()[o:o + piece.nbytes]

    def _copy(self, shard: ShardReader, lo: int, dsts: list[np.ndarray]) -> None:
        """One file-contiguous run into its destinations, split over the copy pool's threads."""
        if self._pool.n == 1 or not shard.concurrent_copies:
            shard.copy_ranges(lo, dsts)
            return
        shares = split_run(lo, [len(d) for d in dsts], self._pool.n)
        self._pool.run([partial(shard.copy_ranges, at, [dsts[i][a:b] for i, a, b in segs])
                        for at, segs in shares])

    def _fill(self, batch: Batch, slot: torch.Tensor) -> dict[int, torch.Tensor]:
        """Read one batch; returns per piece index what the consumer needs besides the slot:
        a pre-passed amax (quantized piece), or the output it was read into (kept piece)."""
        slot_np = slot.numpy()
        pieces = batch.pieces
        # pre-passes first: a syscall reader uses the (still empty) slot as its window
        extra = {i: self._prepass_amax(self.shards[p.spec.shard], p, slot_np)
                 for i, p in enumerate(pieces)
                 if p.row0 == 0 and (p.spec.name, p.expert) in self.prepass}
        if self._into_outputs:
            extra.update((i, self._output(p)) for i, p in enumerate(pieces) if not p.quantize)
        start = 0
        for end in range(1, len(pieces) + 1):      # one read per file-contiguous run
            if end < len(pieces) and pieces[end].spec.shard == pieces[start].spec.shard \
                    and pieces[end].lo == pieces[end - 1].hi:
                continue
            run, run_start, start = pieces[start:end], start, end
            shard, hi = self.shards[run[0].spec.shard], run[-1].hi
            ahead = self.prefetched.get(shard, 0)
            if hi + 2 * self.opts.slot_bytes > ahead:   # keep ~2-4 slots of read-ahead going
                shard.prefetch(max(hi, ahead), hi + 4 * self.opts.slot_bytes)
                self.prefetched[shard] = hi + 4 * self.opts.slot_bytes
            self._copy(shard, run[0].lo, [self._dest(p, slot_np, None if p.quantize else extra.get(i))
                                          for i, p in enumerate(run, run_start)])
            self._sample()
            shard.release_behind(hi)
        return {i: x for i, x in extra.items() if x is not None}

    def _consume(self, asm: Assembler, mover, lease, data, progress) -> Iterator[tuple[str, Loaded]]:
        """Quantize / copy every piece of one batch; yield the tensors it completes."""
        _profile.mark("quantize")
        t1 = time.perf_counter()
        finished = []
        for i, piece in enumerate(lease.item.pieces):
            done = asm.add(lease, piece, data, lease.extra.get(i))
            if done is not None:
                finished.append((piece.spec.name, done))
            self.report.bytes_read += piece.nbytes
            progress.update(piece.nbytes)
        mover.done(lease)
        asm.check()   # NaN / Inf anywhere in this batch: one sync per batch, not per piece
        self._tq += time.perf_counter() - t1
        self._sample()
        yield from finished

    def run(self) -> Iterator[tuple[str, Loaded]]:
        opts, dev = self.opts, self.device
        t0 = time.perf_counter()
        _profile.mark("open")
        self.report.rss_before = read_mem().rss
        self._sample()
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        stage_bytes = max((b.nbytes for b in self.batches), default=0)
        self.shards: dict[Path, ShardReader] = {}
        self.prefetched: dict[ShardReader, int] = {}
        ring = mover = stages = asm = None
        self._pool = CopyPool(1)
        progress = Progress(self.ckpt.total_bytes, enabled=opts.progress)
        try:
            for s in self.ckpt.shards:
                self.shards[s.path] = open_reader(opts.io, s.path, s.file_size,
                                                  drop_page_cache=opts.drop_page_cache,
                                                  max_read=opts.slot_bytes)
            if not self.batches:
                return
            cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
            self._pool = CopyPool(opts.read_threads_for(dev, cpus))
            self.report.read_threads = self._pool.n
            ring = Ring(opts.n_slots, opts.slot_bytes, pin=dev.type == "cuda")
            self.report.pinned = ring.pinned
            # the reader thread's own (quantizers are not thread-safe), for per-tensor amax pre-passes
            self._prepass_quantizer = Quantizer(opts.fp8_dtype, Granularity.TENSOR, device="cpu")
            mover = _device.mover_class(dev)(dev, stage_bytes, self.hold_bytes)
            asm = Assembler(opts, dev, mover)
            _profile.mark("read")
            stages = staged(self.batches, ring, self._fill, self.times)
            # A copying mover (CUDA) looks one batch ahead: batch k+1's copy is queued on the
            # copy stream before batch k is quantized, so the two overlap. (On the CPU the
            # look-ahead would only pin one more slot, which held matrices may need.)
            pending = None
            for lease in stages:
                data = mover.to_device(lease)
                if not mover.copies:
                    yield from self._consume(asm, mover, lease, data, progress)
                    continue
                if pending is not None:
                    yield from self._consume(asm, mover, *pending, progress)
                pending = (lease, data)
            if pending is not None:
                yield from self._consume(asm, mover, *pending, progress)
        finally:
            _profile.mark("done")
            if stages is not None:
                stages.close()  # joins the reader thread, also on exceptions and early close
            self._pool.close()  # then its copy threads
            progress.close()
            if mover is not None:
                mover.close()
            for shard in self.shards.values():
                shard.close()
            self.shards.clear()
            del ring
            r = self.report
            if asm is not None:
                r.tensors, r.quantized, r.retained_bytes = asm.tensors, asm.quantized, asm.retained_bytes
            r.seconds = time.perf_counter() - t0
            r.peak_rss, r.peak_rss_anon, r.peak_rss_file = self._peak
            if dev.type == "cuda":
                r.device_peak = torch.cuda.max_memory_allocated(dev)
            r.stage_seconds = {"read": self.times.fill, "reader_wait": self.times.wait_free,
                               "consumer_wait": self.times.wait_ready, "quantize": self._tq}
            if mover is not None and mover.copies:   # host->device time on the copy stream
                r.stage_seconds["copy"] = mover.copy_seconds


def _pipeline(path, device, options: dict) -> _Pipeline:
    opts = LoadOptions.from_kwargs(**options)
    dev = resolve_device(device)
    return _Pipeline(open_checkpoint(path), dev, opts)


def _results(pipe: _Pipeline, flat_: bool = False) -> Iterator[tuple[str, Loaded]]:
    run = pipe.run()
    items = paired(run, fp8_pairs(pipe.ckpt))
    try:
        yield from _flatten(items) if flat_ else items
    finally:
        run.close()   # joins the reader thread now, not when the generator is collected


def iter_quantized(path, device="cpu", *, flat: bool = False, **options) -> Iterator[tuple[str, Loaded]]:
    """Yield ``(name, tensor)`` in file order: ``QuantizedTensor`` for quantized weights,
    the original tensor (on ``device``, bit-identical) for everything else. FP8 weights
    already in the checkpoint, with their ``_scale`` / ``_scale_inv``, come out as one
    ``QuantizedTensor`` (not re-quantized).

    Every dtype safetensors defines passes through. One the installed torch has comes out as
    that torch dtype and the header's shape (F4 as ``float4_e2m1fn_x2`` with the last dim
    halved, as ``safetensors.safe_open`` gives it). One it lacks (F6_E2M3, F6_E3M2) comes out
    as ``torch.uint8`` holding the file's bytes, the last dim scaled to bytes (1-D if it does
    not hold whole bytes): ``checkpoint.TensorSpec.torch_shape`` says which, and the header's
    dtype and shape (``open_checkpoint(path)[name]``) say how to read it. Such tensors are never
    quantized; ``SafetensorsWriter`` takes them back with their header dtype and shape.

    ``flat=True`` yields plain tensors for engines' weight loaders instead:
    ``("x.weight", fp8)`` followed by ``("x.weight_scale", float32 scale)``.

    Options and the checkpoint are validated now; reading starts at the first ``next()``.
    Closing the generator early stops the reader thread and frees the ring.
    """
    if not isinstance(flat, bool):
        raise OptionsError(f"flat must be True or False, got {flat!r}")
    return _results(_pipeline(path, device, options), flat)


def stream_quantize(path, device="cpu", **options) -> QuantizedModel:
    """Load a safetensors checkpoint onto ``device``, quantizing weights to FP8 on the way.

    Options: ring_bytes (256 MiB), fp8_dtype (torch.float8_e4m3fn), granularity
    ("tensor" | "channel" | "block"), block_size ((128, 128)), skip (extra name patterns
    kept unquantized), progress (False), drop_page_cache (True), error_stats (False),
    keep_partial (False: on a device out-of-memory error, free what was loaded; True: the
    ``DeviceError`` carries it as ``.partial``, a ``QuantizedModel``).
    """
    pipe = _pipeline(path, device, options)
    tensors: dict[str, Loaded] = {}
    try:
        for name, t in _results(pipe):
            tensors[name] = t
    except DeviceError as e:
        if pipe.opts.keep_partial:
            e.partial = QuantizedModel(tensors, pipe.report)
        else:   # free what was retained so far
            tensors.clear()
            if pipe.device.type == "cuda":
                torch.cuda.empty_cache()
        raise
    return QuantizedModel(tensors, pipe.report)
