"""Wire the stages: checkpoint -> mapped shards -> ring -> device quantizer -> results.

``iter_quantized`` yields ``(name, tensor)`` in file order; ``stream_quantize`` keeps them
in a ``QuantizedModel``. A reader thread (ring.py) fills slots from the maps while this
module's consumer moves each slot to the device, quantizes its pieces and retains only
the FP8 data and scales. No view into a ring slot ever reaches the caller.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable, Iterator

import torch

from . import device as _device
from . import phases
from ._procmem import read_mem
from ._progress import Progress
from .assemble import Assembler, Loaded
from .checkpoint import Checkpoint, open_checkpoint
from .device import resolve_device
from .errors import DeviceError, OptionsError
from .fill import Filler
from .readers import ShardReader
from .config import RING_BYTES, LoadConfig, LoadOptions, config_from, public_verb
from .prequantized import fp8_pairs, paired, unscaled_fp8
from .readers import open_reader
from .policy import LINEAR, Policy, policy_for
from .plan import plan_batches, scale_groups, split_groups
from .result import LoadReport, QuantizedModel, flat as _flatten
from .ring import CopyPool, Ring, StageTimes, staged

__all__ = ["stream_quantize", "iter_quantized"]


class _Pipeline:
    def __init__(self, ckpt: Checkpoint, device: torch.device, opts: LoadOptions, policy: Policy):
        self.ckpt, self.device, self.opts, self.policy = ckpt, device, opts, policy
        self.batches = plan_batches(ckpt.tensors, policy, opts.slot_bytes, opts.granularity,
                                    opts.block_size)   # raises before any I/O
        self.report = LoadReport(path=str(ckpt.root), device=str(device), ring_bytes=opts.ring_bytes,
                                 slot_bytes=opts.slot_bytes, policy=policy.source)
        self.times = StageTimes()
        self._peak = [0, 0, 0]   # rss, anon, file
        self._tq = 0.0           # consumer seconds (quantize + copies out of the slots)
        # scale groups shared by several pieces: held, or pre-passed by the reader
        self.groups = scale_groups(self.batches)
        self.prepass, self.hold_bytes = split_groups(self.batches, opts.n_slots,
                                                     _device.mover_class(device).copies)
        # In place (CPU) the slot is no stop on the way for a tensor kept as it is: the reader
        # reads it straight into its output, one copy instead of two, and the output's first-touch
        # page faults land on the reader thread (which waits for slots anyway), not the consumer.
        self._into_outputs = not _device.mover_class(device).copies

    def _sample(self) -> None:
        """Peak memory so far (called by the reader thread and the consumer)."""
        m = read_mem()
        p = self._peak
        p[0] = max(p[0], m.rss)
        p[1] = max(p[1], m.anon or 0)
        p[2] = max(p[2], m.file or 0)

    def _consume(self, asm: Assembler, mover, lease, data, progress) -> Iterator[tuple[str, Loaded]]:
        """Quantize / copy every piece of one batch; yield the tensors it completes."""
        phases.mark("quantize")
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
        phases.mark("open")
        self.report.rss_before = read_mem().rss
        self._sample()
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        stage_bytes = max((b.nbytes for b in self.batches), default=0)
        self.shards: dict[Path, ShardReader] = {}
        ring = mover = stages = asm = None
        self._pool = CopyPool(1)
        progress = Progress(self.ckpt.total_bytes, enabled=opts.progress)
        try:
            for s in self.ckpt.shards:
                self.shards[s.path] = open_reader(opts.io, s, drop_page_cache=opts.drop_page_cache,
                                                  max_read=opts.slot_bytes)
            if not self.batches:
                return
            cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
            self._pool = CopyPool(opts.read_threads_for(dev, cpus))
            self.report.read_threads = self._pool.n
            ring = Ring(opts.n_slots, opts.slot_bytes, pin=dev.type == "cuda")
            self.report.pinned = ring.pinned
            fill = Filler(self.shards, opts.slot_bytes, dev, self._pool,
                          {g: self.groups[g] for g in self.prepass}, self._into_outputs, self._sample)
            mover = _device.mover_class(dev)(dev, stage_bytes, self.hold_bytes)
            asm = Assembler(opts, dev, mover)
            phases.mark("read")
            stages = staged(self.batches, ring, fill, self.times)
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
            phases.mark("done")
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


def prepare(path, device, config: LoadConfig, *, module: torch.nn.Module | None = None,
            narrow: Callable[[Policy], Policy] | None = None) -> _Pipeline:
    """Check device and checkpoint and build the policy and the plan under ``config`` (already
    validated); no data is read yet. ``module``: judge tensors by this model (load_into);
    ``narrow``: adjust the policy (convert keeps what its formats cannot describe)."""
    if not isinstance(config, LoadConfig):
        raise OptionsError(f"prepare needs a LoadConfig, got {type(config).__name__}")
    dev = resolve_device(device)
    ckpt = open_checkpoint(path)
    policy = policy_for(ckpt, config, module)
    return _Pipeline(ckpt, dev, config, narrow(policy) if narrow else policy)


def results(pipe: _Pipeline, flat_: bool = False) -> Iterator[tuple[str, Loaded]]:
    """The pipeline's ``(name, tensor)`` stream, FP8 pairs of the source joined."""
    run = pipe.run()
    pairs = fp8_pairs(pipe.ckpt, pipe.policy.config, pipe.opts.block_size)
    scale = pipe.opts.fp8_weight_scale
    unscaled = {} if scale is None else {w.name: float(scale) for w in unscaled_fp8(
        pipe.ckpt, pairs, lambda s: pipe.policy.decide(s).kind == LINEAR)}
    items = paired(run, pairs, pipe.ckpt, unscaled)
    try:
        yield from _flatten(items) if flat_ else items
    finally:
        run.close()   # joins the reader thread now, not when the generator is collected


@public_verb
def iter_quantized(path, device="cpu", *, flat: bool = False, ring_bytes: int = RING_BYTES,
                   fp8_dtype=torch.float8_e4m3fn, granularity="tensor", block_size=(128, 128), skip=(),
                   ignore=(), targets=None, policy: str = "auto", fp8_weight_scale: float | None = None,
                   progress: bool = False, drop_page_cache: bool = True, error_stats: bool = False,
                   keep_partial: bool = False, io: str = "mmap",
                   read_threads: int | None = None) -> Iterator[tuple[str, Loaded]]:
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

    Options and the checkpoint are validated now; reading starts at the first ``next()``.
    Closing the generator early stops the reader thread and frees the ring.

    Args:
        path (`str` or `os.PathLike`): a ``.safetensors`` file, a sharded index, or a folder.
        device (`str` or `torch.device`, default "cpu"): where tensors land ("cpu", "cuda[:N]").
        flat (`bool`, default False): yield plain tensors for engines' weight loaders instead:
            ``("x.weight", fp8)`` followed by ``("x.weight_scale", float32 scale)``.
        ring_bytes, fp8_dtype, granularity, block_size, skip, ignore, targets, policy,
            fp8_weight_scale, progress, drop_page_cache, error_stats, keep_partial, io, read_threads:
            the load options, each documented (units, default, errors) on ``mmapload.LoadConfig``;
            the defaults here are its defaults.

    Returns:
        `Iterator[tuple[str, QuantizedTensor | torch.Tensor]]`: a generator; close it to stop early.

    Raises:
        OptionsError: a bad option (naming it), before any I/O. CheckpointError / HeaderError /
            ShardIndexError: a bad checkpoint. QuantizedSourceError: a checkpoint quantized by
            another method. DeviceError, NonFiniteError, FileChangedError: while streaming.

    Example:

    ```python
    from mmapload import iter_quantized

    for name, t in iter_quantized("path/to/checkpoint", "cuda:0", granularity="channel"):
        print(name, t.shape)
    ```
    """
    if not isinstance(flat, bool):
        raise OptionsError(f"flat must be True or False, got {flat!r}")
    return results(prepare(path, device, config_from(locals())), flat)


@public_verb
def stream_quantize(path, device="cpu", *, ring_bytes: int = RING_BYTES, fp8_dtype=torch.float8_e4m3fn,
                    granularity="tensor", block_size=(128, 128), skip=(), ignore=(), targets=None,
                    policy: str = "auto", fp8_weight_scale: float | None = None, progress: bool = False,
                    drop_page_cache: bool = True, error_stats: bool = False, keep_partial: bool = False,
                    io: str = "mmap", read_threads: int | None = None) -> QuantizedModel:
    """Load a safetensors checkpoint onto ``device``, quantizing weights to FP8 on the way.

    What is quantized is the policy's (policy.py): the weights of the nn.Linear modules and
    fused MoE experts of the model config.json describes (built on meta), else a name rule.
    Host memory stays near ``ring_bytes`` plus (on the CPU) what is kept.

    Args:
        path (`str` or `os.PathLike`): a ``.safetensors`` file, a sharded index, or a folder.
        device (`str` or `torch.device`, default "cpu"): where tensors land ("cpu", "cuda[:N]").
        ring_bytes, fp8_dtype, granularity, block_size, skip, ignore, targets, policy,
            fp8_weight_scale, progress, drop_page_cache, error_stats, keep_partial, io, read_threads:
            the load options, each documented (units, default, errors) on ``mmapload.LoadConfig``;
            the defaults here are its defaults.

    Returns:
        `QuantizedModel`: name -> ``QuantizedTensor`` (``.data`` FP8, ``.scale`` float32) or
        ``torch.Tensor``, with ``.report`` (``LoadReport``).

    Raises:
        OptionsError: a bad option (naming it), before any I/O. CheckpointError / HeaderError /
            ShardIndexError: a bad checkpoint. QuantizedSourceError: a checkpoint quantized by
            another method (GPTQ, AWQ, ...). NonFiniteError: a NaN/Inf weight. DeviceError: out of
            device memory (with ``keep_partial=True`` it carries ``.partial``, a ``QuantizedModel``).

    Example:

    ```python
    from mmapload import stream_quantize

    model = stream_quantize("path/to/checkpoint", "cuda:0", granularity="block", block_size=(128, 128))
    w = model["model.layers.0.mlp.up_proj.weight"]   # QuantizedTensor
    ```
    """
    pipe = prepare(path, device, config_from(locals()))
    tensors: dict[str, Loaded] = {}
    try:
        for name, t in results(pipe):
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
