"""Wire the stages: checkpoint -> mapped shards -> ring -> device quantizer -> results.

``iter_quantized`` yields ``(name, tensor)`` in file order; ``stream_quantize`` keeps them
in a ``QuantizedModel``. A reader thread (ring.py) fills slots from the maps while this
module's consumer moves each slot to the device, quantizes its pieces and retains only
the FP8 data and scales. No view into a ring slot ever reaches the caller.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Iterator

import torch

from ._procmem import read_mem
from ._progress import Progress
from .checkpoint import Checkpoint, TensorSpec, open_checkpoint
from .device import make_mover, resolve_device
from .errors import NonFiniteError
from .fp8 import Granularity, Quantizer, merge_amax, scale_from_amax, scale_shape
from .mapped import MappedShard
from .options import LoadOptions, should_quantize
from .plan import Batch, Piece, matrix_dims, plan_batches
from .result import LoadReport, QuantizedModel, QuantizedTensor, tensor_nbytes
from .ring import Ring, StageTimes, staged

__all__ = ["stream_quantize", "iter_quantized"]

Loaded = QuantizedTensor | torch.Tensor


class _Building:
    """A tensor whose pieces are still arriving."""

    def __init__(self, spec: TensorSpec, quantize: bool, opts: LoadOptions, device: torch.device):
        self.spec, self.quantize = spec, quantize
        self.err2 = self.ref2 = 0.0
        if quantize:
            self.out = torch.empty(spec.shape, dtype=opts.fp8_dtype, device=device)
            self.scale = torch.empty(scale_shape(spec.shape, opts.granularity, opts.block_size),
                                     dtype=torch.float32, device=device)
            e, rows, cols = matrix_dims(spec.shape)
            self.out3 = self.out.view(e, rows, cols)
            self.scale3 = self.scale.view(e, *self.scale.shape[-2:]) if self.scale.dim() >= 2 \
                else self.scale.view(1, 1, 1)
        else:
            self.out = torch.empty(spec.shape, dtype=spec.torch_dtype, device=device)
            self.bytes = self.out.reshape(-1).view(torch.uint8)


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

    # -- reader thread -----------------------------------------------------------------
    def _sample(self) -> None:
        m = read_mem()
        p = self._peak
        p[0] = max(p[0], m.rss)
        p[1] = max(p[1], m.anon or 0)
        p[2] = max(p[2], m.file or 0)

    def _prepass_amax(self, shard: MappedShard, piece: Piece) -> torch.Tensor:
        """Per-tensor amax of a matrix too big for one slot, read straight from the map.

        The cast of the first chunk needs the amax of all of them. Reading the map in
        slot-sized windows and dropping each window from our RSS (but not from the page
        cache, so the copy pass that follows is a warm read) keeps host memory bounded.
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
            shard.populate(w0, w1)
            raw = shard.tensor(w0, w1)
            if w0 % 64:
                raw = raw.clone()  # an unaligned map offset: typed views need alignment
            x = raw.view(spec.torch_dtype).view(-1, cols)
            part = self._prepass_quantizer.amax_2d(x)
            amax = part if amax is None else merge_amax(amax, part)
            del x, raw
            shard.release(w0, w1, drop_cache=False)
        return amax

    def _fill(self, batch: Batch, slot: torch.Tensor) -> dict[int, torch.Tensor]:
        slot_np = slot.numpy()
        prepass: dict[int, torch.Tensor] = {}
        window = 2 * self.opts.slot_bytes
        for i, piece in enumerate(batch.pieces):
            shard = self.shards[piece.spec.shard]
            if (piece.quantize and not piece.whole and piece.row0 == 0
                    and self.opts.granularity is Granularity.TENSOR):
                prepass[i] = self._prepass_amax(shard, piece)
            if piece.hi + window > self.prefetched.get(shard, 0):
                start = max(piece.hi, self.prefetched.get(shard, 0))
                shard.prefetch(start, piece.hi + 2 * window)
                self.prefetched[shard] = piece.hi + 2 * window
            shard.copy_into(piece.lo, piece.hi, slot_np[piece.offset:piece.offset + piece.nbytes])
            self._sample()
            shard.release_behind(piece.hi)
        return prepass

    # -- consumer ----------------------------------------------------------------------
    def _quantize_piece(self, b: _Building, piece: Piece, x: torch.Tensor, prepass) -> None:
        opts, gran = self.opts, self.opts.granularity
        if gran is Granularity.TENSOR:
            amax = prepass.to(self.device) if prepass is not None else \
                self.quantizer.amax_2d(x) if piece.whole else None
            if amax is None:  # a later chunk: the scale was set by the first one
                scale = b.scale3[piece.expert, 0, 0]
            else:
                scale = b.scale3[piece.expert, 0, 0]
                scale.copy_(scale_from_amax(amax, opts.fp8_dtype))
        else:
            amax = self.quantizer.amax_2d(x)
            if gran is Granularity.CHANNEL:
                scale = b.scale3[piece.expert, piece.row0:piece.row1]
            else:
                br = opts.block_size[0]
                scale = b.scale3[piece.expert, piece.row0 // br:-(-piece.row1 // br)]
            scale.copy_(scale_from_amax(amax, opts.fp8_dtype))
        if amax is not None and not bool(torch.isfinite(amax).all()):
            spec = piece.spec
            raise NonFiniteError(
                f"{spec.shard}: tensor {spec.name!r} (bytes {spec.start}..{spec.end}; rows "
                f"{piece.row0}..{piece.row1} of matrix {piece.expert}) contains NaN or Inf; the "
                f"checkpoint is corrupt, or pass skip=[{spec.name!r}] to load it unquantized")
        out = b.out3[piece.expert, piece.row0:piece.row1]
        self.quantizer.quantize_2d_into(x, scale, out)
        if opts.error_stats:
            from .fp8 import dequantize
            deq = dequantize(out, scale, gran, opts.block_size, dtype=torch.float32)
            xf = x.float()
            b.err2 += float((xf - deq).pow_(2).sum())
            b.ref2 += float(xf.pow(2).sum())

    def _finish(self, b: _Building) -> Loaded:
        r = self.report
        r.tensors += 1
        if not b.quantize:
            r.retained_bytes += tensor_nbytes(b.out)
            return b.out
        r.quantized += 1
        rel = (b.err2 ** 0.5 / b.ref2 ** 0.5 if b.ref2 > 0 else 0.0) if self.opts.error_stats else None
        qt = QuantizedTensor(b.out, b.scale, b.spec.torch_dtype, self.opts.granularity,
                             self.opts.block_size, rel)
        r.retained_bytes += qt.nbytes
        return qt

    def run(self) -> Iterator[tuple[str, Loaded]]:
        opts, dev = self.opts, self.device
        t0 = time.perf_counter()
        self.report.rss_before = read_mem().rss
        self._sample()
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        stage_bytes = max((b.nbytes for b in self.batches), default=0)
        self.shards: dict[Path, MappedShard] = {}
        self.prefetched: dict[MappedShard, int] = {}
        ring = mover = stages = None
        progress = Progress(self.ckpt.total_bytes, enabled=opts.progress)
        tq = 0.0
        try:
            for s in self.ckpt.shards:
                self.shards[s.path] = MappedShard(s.path, s.file_size, drop_page_cache=opts.drop_page_cache)
            if not self.batches:
                return
            ring = Ring(opts.n_slots, opts.slot_bytes, pin=dev.type == "cuda")
            self.report.pinned = ring.pinned
            self.quantizer = Quantizer(opts.fp8_dtype, opts.granularity, opts.block_size, device=dev)
            # the reader thread's own (quantizers are not thread-safe), for per-tensor amax pre-passes
            self._prepass_quantizer = Quantizer(opts.fp8_dtype, Granularity.TENSOR, device="cpu")
            mover = make_mover(dev, stage_bytes)
            building: _Building | None = None
            stages = staged(self.batches, ring, self._fill, self.times)
            for lease in stages:
                data = mover.to_device(lease)
                t1 = time.perf_counter()
                finished = []
                for i, piece in enumerate(lease.item.pieces):
                    if piece.first:
                        building = _Building(piece.spec, piece.quantize, opts, dev)
                    raw = data[piece.offset:piece.offset + piece.nbytes]
                    if piece.quantize:
                        _, _, cols = matrix_dims(piece.spec.shape)
                        x = raw.view(piece.spec.torch_dtype).view(-1, cols)
                        self._quantize_piece(building, piece, x, lease.extra.get(i))
                    else:
                        o = piece.lo - piece.spec.start
                        building.bytes[o:o + piece.nbytes].copy_(raw)
                    self.report.bytes_read += piece.nbytes
                    progress.update(piece.nbytes)
                    if piece.last:
                        finished.append((piece.spec.name, self._finish(building)))
                        building = None
                mover.done(lease)
                tq += time.perf_counter() - t1
                self._sample()
                yield from finished
        finally:
            if stages is not None:
                stages.close()  # joins the reader thread, also on exceptions and early close
            progress.close()
            if mover is not None:
                mover.close()
            for shard in self.shards.values():
                shard.close()
            self.shards.clear()
            del ring
            r = self.report
            r.seconds = time.perf_counter() - t0
            r.peak_rss, r.peak_rss_anon, r.peak_rss_file = self._peak
            if dev.type == "cuda":
                r.device_peak = torch.cuda.max_memory_allocated(dev)
            r.stage_seconds = {"read": self.times.fill, "reader_wait": self.times.wait_free,
                               "consumer_wait": self.times.wait_ready, "quantize": tq}


def _pipeline(path, device, options: dict) -> _Pipeline:
    opts = LoadOptions.from_kwargs(**options)
    dev = resolve_device(device)
    return _Pipeline(open_checkpoint(path), dev, opts)


def iter_quantized(path, device="cpu", **options) -> Iterator[tuple[str, Loaded]]:
    """Yield ``(name, tensor)`` in file order: ``QuantizedTensor`` for quantized weights,
    the original tensor (on ``device``, bit-identical) for everything else.

    Options and the checkpoint are validated now; reading starts at the first ``next()``.
    Closing the generator early stops the reader thread and frees the ring.
    """
    return _pipeline(path, device, options).run()


def stream_quantize(path, device="cpu", **options) -> QuantizedModel:
    """Load a safetensors checkpoint onto ``device``, quantizing weights to FP8 on the way.

    Options: ring_bytes (256 MiB), fp8_dtype (torch.float8_e4m3fn), granularity
    ("tensor" | "channel" | "block"), block_size ((128, 128)), skip (extra name patterns
    kept unquantized), progress (False), drop_page_cache (True), error_stats (False).
    """
    pipe = _pipeline(path, device, options)
    tensors = dict(pipe.run())
    return QuantizedModel(tensors, pipe.report)
