"""One load, run: a reader side and a consumer side around the ring (stream.py's engine).

Two threads, each with the state it owns:
- ``_ReaderSide`` (the reader thread, ring.py): the shards' readers, the copy pool, the
  ``Filler`` and the peak memory it saw while reading;
- ``_ConsumerSide`` (the thread iterating ``Pipeline.run``): the mover, the assembler, the
  progress bar, its own peaks and timings.
Neither writes the other's state; ``StageTimes`` has one field per writer. Both are made
before the reader thread starts and read again only after it was joined, when their
stats are merged into the ``LoadReport``.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Iterator

import torch

from . import phases, transfer
from ._procmem import read_mem
from ._progress import Progress
from .assemble import Assembler
from .result import Loaded
from .tp_group import TPGroup
from .checkpoint import Checkpoint
from .fill import Filler, Prepared
from .config import LoadOptions
from .errors import OptionsError
from .plan import Batch, LoadPlan, plan_load
from .policy import Policy
from .readers import ShardReader, open_reader
from .result import LoadReport, OutFor
from .ring import CopyPool, Lease, Ring, StageTimes, staged

__all__ = ["Pipeline", "Peaks"]


class Peaks:
    """Peak memory one thread saw (bytes): RSS, its anonymous and file-backed parts. Each
    thread samples its own instance; ``merge`` combines them after the threads joined."""

    def __init__(self) -> None:
        self.rss = self.anon = self.file = 0

    def sample(self) -> None:
        m = read_mem()
        self.rss = max(self.rss, m.rss)
        self.anon = max(self.anon, m.anon or 0)
        self.file = max(self.file, m.file or 0)

    def merge(self, other: "Peaks") -> "Peaks":
        out = Peaks()
        out.rss, out.anon, out.file = (max(self.rss, other.rss), max(self.anon, other.anon),
                                       max(self.file, other.file))
        return out


class _ReaderSide:
    """What the reader thread uses: opened by the consumer before the thread starts, closed
    after it was joined."""

    def __init__(self, ckpt: Checkpoint, plan: LoadPlan, opts: LoadOptions, device: torch.device,
                 out_for: OutFor | None = None):
        self.ckpt, self.plan, self.opts, self.device, self.out_for = ckpt, plan, opts, device, out_for
        self.shards: dict[Path, ShardReader] = {}
        self.pool = CopyPool(1)
        self.peaks = Peaks()
        self.filler: Filler | None = None

    def open(self) -> None:
        for s in self.ckpt.shards:
            self.shards[s.path] = open_reader(self.opts.io, s, drop_page_cache=self.opts.drop_page_cache,
                                              max_read=self.opts.slot_bytes)
        if not self.plan.batches:
            return
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        self.pool = CopyPool(self.opts.read_threads_for(self.device, cpus))
        views = self.opts.io == "view" and self.device.type == "cpu" and self.plan.tp_size == 1
        self.filler = Filler(self.shards, self.plan, self.device, self.pool, self.peaks.sample, self.out_for,
                             views)

    def close(self) -> None:
        """After the reader thread was joined: the last batches' viewed pages, its copy threads, then
        the shards."""
        if self.filler is not None:
            self.filler.release_views()
            self.filler.drop_ahead()
        self.pool.close()
        for shard in self.shards.values():
            shard.close()
        self.shards.clear()


class _ConsumerSide:
    """What the consumer thread uses: moves each batch to the device and assembles it."""

    def __init__(self, ckpt: Checkpoint, plan: LoadPlan, opts: LoadOptions, device: torch.device,
                 group: TPGroup | None, out_for: OutFor | None = None):
        self.plan, self.opts, self.device, self.group, self.out_for = plan, opts, device, group, out_for
        self.peaks = Peaks()
        self.progress = Progress(plan.total_bytes, enabled=opts.progress)
        self.mover: transfer.Mover | None = None
        self.asm: Assembler | None = None
        self.quantize_seconds = 0.0    # quantize + copies out of the slots
        self.bytes_read = 0

    def open(self) -> None:
        self.mover = transfer.mover_class(self.device)(self.device, self.plan.stage_bytes,
                                                       self.plan.hold_bytes)
        self.asm = Assembler(self.opts, self.device, self.mover, self.plan, self.group, self.out_for)

    def consume(self, lease: Lease[Batch, Prepared], data: torch.Tensor) -> Iterator[tuple[str, Loaded]]:
        """Quantize / copy every piece of one batch; yield the tensors it completes."""
        asm, prep = self.asm, lease.prepared
        phases.mark("quantize")
        t1 = time.perf_counter()
        for i, piece in enumerate(lease.item.pieces):
            asm.add(lease, piece, data, prep.amax.get(i), prep.outputs.get(i), prep.views.get(i))
            self.bytes_read += piece.nbytes
            self.progress.update(piece.nbytes)
        finished = asm.flush()     # TP: the batch's one amax collective, then its waiting casts
        self.mover.done(lease)
        lease.done()
        asm.check()   # NaN / Inf anywhere in this batch: one sync per batch, not per piece
        self.quantize_seconds += time.perf_counter() - t1
        self.peaks.sample()
        yield from finished

    def close(self) -> None:
        self.progress.close()
        if self.mover is not None:
            self.mover.close()


class Pipeline:
    """One load of ``ckpt`` onto ``device``: the plan is made now (raising before any I/O),
    ``run()`` reads and yields ``(name, tensor)`` in file order, then fills ``report``."""

    def __init__(self, ckpt: Checkpoint, device: torch.device, opts: LoadOptions, policy: Policy):
        self.ckpt, self.device, self.opts, self.policy = ckpt, device, opts, policy
        self.group = TPGroup.resolve(opts, device)   # None without tensor parallelism
        self.plan = plan_load(ckpt, policy, opts, device, self.group.rank if self.group else 0)
        # the ring the load allocates: never more slots than it has batches (plus one), whatever was asked
        self.report = LoadReport(path=str(ckpt.root), device=str(device),
                                 ring_bytes=self.plan.n_slots * self.plan.slot_bytes,
                                 slot_bytes=self.plan.slot_bytes, policy=policy.source,
                                 tp_rank=self.plan.tp_rank, tp_size=self.plan.tp_size)
        self.times = StageTimes()

    def run(self, out_for: OutFor | None = None) -> Iterator[tuple[str, Loaded]]:
        """``out_for(name, shape, dtype)``: a tensor of the caller's that a tensor kept as it is (not
        quantized) is read into and yielded as, instead of a new one (result.provided_output says
        which it takes); an engine's own parameters, so the model is not held twice."""
        plan, dev = self.plan, self.device
        t0 = time.perf_counter()
        phases.mark("open")
        self.report.rss_before = read_mem().rss
        reader = _ReaderSide(self.ckpt, plan, self.opts, dev, out_for)
        consumer = _ConsumerSide(self.ckpt, plan, self.opts, dev, self.group, out_for)
        consumer.peaks.sample()
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        ring = stages = None
        try:
            if self.group is not None:
                self.group.check_same(fingerprint(plan, self.opts), "the plan check before reading")
            reader.open()
            if not plan.batches:
                if self.group is not None:
                    self.group.finish()
                return
            self.report.read_threads = reader.pool.n if any(s.concurrent_copies for s in reader.shards.values()) else 1
            try:
                ring = Ring(plan.n_slots, plan.slot_bytes, pin=dev.type == "cuda")
            except RuntimeError as e:   # torch could not allocate it (host memory, or pinned memory)
                raise OptionsError(f"ring_bytes={self.opts.ring_bytes}: could not allocate the ring of "
                                   f"{plan.n_slots} x {plan.slot_bytes} bytes ({e}); pass a smaller "
                                   "ring_bytes") from None
            self.report.pinned = ring.pinned
            consumer.open()
            phases.mark("read")
            stages = staged(plan.batches, ring, reader.filler, self.times)
            # A copying mover (CUDA) looks one batch ahead: batch k+1's copy is queued on the
            # copy stream before batch k is quantized, so the two overlap. (On the CPU the
            # look-ahead would only pin one more slot, which held matrices may need.)
            pending = None
            for lease in stages:
                data = consumer.mover.to_device(lease)
                if not plan.copies:
                    yield from consumer.consume(lease, data)
                    continue
                if pending is not None:
                    yield from consumer.consume(*pending)
                pending = (lease, data)
            if pending is not None:
                yield from consumer.consume(*pending)
            if self.group is not None:
                self.group.finish()
        finally:
            phases.mark("done")
            if self.group is not None:
                self.group.left()   # stopped between collectives (an error, an early close): say so next time
            if stages is not None:
                stages.close()  # joins the reader thread, also on exceptions and early close
            reader.close()
            consumer.close()
            del ring
            self._report(reader, consumer, time.perf_counter() - t0)

    def _report(self, reader: _ReaderSide, consumer: _ConsumerSide, seconds: float) -> None:
        """Both sides' stats into the report (after the reader thread was joined)."""
        r, asm = self.report, consumer.asm
        r.bytes_read = consumer.bytes_read
        if asm is not None:
            r.tensors, r.quantized, r.retained_bytes = asm.tensors, asm.quantized, asm.retained_bytes
        r.seconds = seconds
        peaks = reader.peaks.merge(consumer.peaks)
        r.peak_rss, r.peak_rss_anon, r.peak_rss_file = peaks.rss, peaks.anon, peaks.file
        if self.device.type == "cuda":
            r.device_peak = torch.cuda.max_memory_allocated(self.device)
        r.stage_seconds = {"read": self.times.fill, "reader_wait": self.times.wait_free,
                           "consumer_wait": self.times.wait_ready, "quantize": consumer.quantize_seconds}
        if consumer.mover is not None and consumer.mover.copies:   # host->device time on the copy stream
            r.stage_seconds["copy"] = consumer.mover.copy_seconds
        if self.group is not None:
            r.collectives = self.group.count
            r.stage_seconds["collectives"] = self.group.seconds


def fingerprint(plan: LoadPlan, opts: LoadOptions) -> str:
    """What must be alike on every TP rank for their collectives to match: the options that
    shape the plan and, per batch, its tensors' parts and pieces (not the file offsets, which
    differ by rank)."""
    head = (plan.tp_size, str(opts.scheme), str(opts.fp8_dtype), plan.n_slots, plan.slot_bytes,
            sorted(plan.prepass))
    body = [[(p.spec.name, plan.shape_of(p.spec), p.quantize, p.group, p.row0, p.row1, p.col0, p.col1)
             for p in b.pieces] for b in plan.batches]
    return repr((head, body))
