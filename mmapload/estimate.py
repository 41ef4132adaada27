"""What a load will need, from the headers alone: ``estimate(path, device, ...load options)``.

Reads only the headers (``open_checkpoint``) and config.json, so it takes milliseconds on a
100 GB checkpoint with ``policy="names"``; the default policy adds the seconds transformers
takes to build the model on meta (skeleton.py), and needs no GPU to project a CUDA load. The
memory model reads the load's own plan (plan.plan_load: batches, held / pre-passed groups,
hold buffer) and follows what pipeline.py / assemble.py / transfer.py allocate; every term is
an upper bound:

Host peak, above the RSS the process had before the load (with torch imported and, for
CUDA, the CUDA context already created):
  CPU device:  ring (n_slots x slot_bytes)
             + retained bytes (the outputs live in host RAM)
             + reader buffers, by ``io``: mmap 2 x slot_bytes (the mapped pages of a run and
               of a pre-pass window, each released behind the reader) + 2 pages per row of
               the tallest band cut into columns (pages its pieces' rows share stay mapped
               until the band is done); pread 0 (it reads
               into the slot); direct one bounce buffer of
               slot_bytes + 2 pages per shard (each is kept until the load ends)
             + 2 quantizers' scratch (1 MiB float32 each: consumer and reader pre-pass)
             + amax grids (20 bytes per granule row of the largest piece, reader and consumer)
             + error_stats temporaries (12 bytes per element of the largest piece), if on
             + HOST_MARGIN
  CUDA device: ring rounded up to a power of two (torch's pinned-memory allocator does)
             + reader buffers as above, mmap only 1 x slot_bytes (no pre-pass on CUDA)
             + 1 MiB reader scratch + HOST_MARGIN
Device peak (CUDA; what ``torch.cuda.max_memory_allocated`` can reach during the load):
    retained bytes, each tensor rounded up to the allocator's 512 bytes
  + 2 staging buffers (each the largest batch, <= slot_bytes)
  + hold buffer (the largest scale group cut into pieces: a per-tensor matrix, a channel
    row or a block granule; LoadPlan.hold_bytes)
  + quantizer scratch (4M float32 = 16 MiB) + amax grids + error_stats temporaries
On the CPU the device is host RAM: ``device_peak`` is None and ``fits`` uses the host peak.

Tensor parallelism (``tp_size`` > 1): the projection is one rank's (``tp_rank``, default 0;
every rank has the same sizes): its plan (plan.plan_load with the rank) and its local shapes
(``LoadPlan.shape_of``) for the retained bytes, so FP8 data, scales, kept tensors and bytes read
are the rank's share; ``tp1`` holds the same load at TP=1, for comparison. The collectives'
buffers (a float per granule of a batch) are in the margin.

HOST_MARGIN (64 MiB) covers what the model does not itemise: malloc arenas and the torch
allocator's caching, the Python objects of the results, page rounding. Measured (fresh
processes, 2-core CPU machine, 128 MiB-1 GiB llama-shaped checkpoints, rings of 4-256 MiB,
every granularity and io mode, with and without pre-passes): peak RSS above baseline came
to at most 15 MiB more than the itemised terms, so the margin leaves about 50 MiB of headroom.
``fits`` also reserves on the device CUDA_CONTEXT (512 MiB) and DEVICE_MARGIN (64 MiB, for
caching-allocator segments reserved beyond what is allocated): estimates, not measured here.
"""

from __future__ import annotations

import dataclasses
import math
import mmap
from dataclasses import dataclass, field

import torch

from .checkpoint import TensorSpec, open_checkpoint
from ._math import ceil_div, round_up
from .fp8 import Granularity, default_scratch_elems
from .config import RING_BYTES, LoadConfig, LoadOptions, config_from, public_verb
from .plan import plan_load
from .decide import policy_for
from .transfer import parse_device

__all__ = ["Projection", "TensorGroup", "estimate", "HOST_MARGIN", "DEVICE_MARGIN", "CUDA_CONTEXT"]

HOST_MARGIN = 64 << 20
DEVICE_MARGIN = 64 << 20
CUDA_CONTEXT = 512 << 20
_CPU_SCRATCH = 4 * default_scratch_elems("cpu")     # bytes of one quantizer's float32 scratch
_CUDA_SCRATCH = 4 * default_scratch_elems("cuda")
_PAGE = mmap.PAGESIZE
_CUDA_ROUND = 512             # the CUDA caching allocator's size granularity
_NAMES = 3                    # example names kept per group


@dataclass(frozen=True)
class TensorGroup:
    count: int = 0
    nbytes: int = 0                      # bytes in the checkpoint
    names: tuple[str, ...] = ()          # the first few, in file order


@dataclass(frozen=True)
class Projection:
    """Totals of a checkpoint and the memory a load with ``options`` on ``device`` needs."""

    path: str
    device: str
    options: LoadOptions
    total_bytes: int
    tensors: int
    shards: tuple[tuple[str, int, int], ...]          # (file name, tensors, bytes)
    dtypes: dict[str, tuple[int, int]]                # dtype -> (tensors, bytes)
    largest: tuple[TensorSpec, ...]
    quantized: TensorGroup
    kept: TensorGroup
    kept_by: dict[str, TensorGroup]                   # rule (policy.py) -> the tensors it kept
    policy: str                                       # the model the rules come from, or the name rule
    fp8_bytes: int                                    # FP8 data of the quantized tensors
    scale_bytes: int                                  # their scales (float32, or scale_dtype="weight")
    ring_bytes: int                                   # n_slots x slot_bytes
    stage_bytes: int                                  # largest batch
    hold_bytes: int                                   # CUDA hold buffer
    prepass: int                                      # CPU: scale groups read twice (pre-pass)
    bytes_read: int                                   # file bytes the load reads (a TP rank: its share)
    kept_bytes: int                                   # what the kept tensors retain (a TP rank: its
                                                      # slices of them; else kept.nbytes)
    host_terms: dict[str, int] = field(default_factory=dict)
    device_terms: dict[str, int] | None = None
    tp_rank: int = 0
    tp_size: int = 1
    tp1: "Projection | None" = None                   # TP: the same load at TP=1, for comparison

    @property
    def retained_bytes(self) -> int:
        """What the loaded model keeps: FP8 data + scales + the kept tensors."""
        return self.fp8_bytes + self.scale_bytes + self.kept_bytes

    @property
    def host_peak(self) -> int:
        return sum(self.host_terms.values())

    @property
    def device_peak(self) -> int | None:
        return None if self.device_terms is None else sum(self.device_terms.values())

    def needed(self) -> int:
        """Memory the device must offer: host peak on the CPU; on CUDA the device peak
        plus CUDA_CONTEXT and DEVICE_MARGIN."""
        if self.device_peak is None:
            return self.host_peak
        return self.device_peak + CUDA_CONTEXT + DEVICE_MARGIN

    def fits(self, device_memory: int) -> bool:
        return self.needed() <= device_memory

    def as_dict(self, device_memory: int | None = None) -> dict:
        o = self.options
        return {
            "path": self.path, "device": self.device, "total_bytes": self.total_bytes,
            "tensors": self.tensors,
            "options": {"ring_bytes": o.ring_bytes, "slot_bytes": o.slot_bytes, "n_slots": o.n_slots,
                        "granularity": o.granularity.value, "fp8_dtype": str(o.fp8_dtype),
                        "skip": list(o.skip), "io": o.io},
            "shards": [{"file": f, "tensors": n, "bytes": b} for f, n, b in self.shards],
            "dtypes": {d: {"tensors": n, "bytes": b} for d, (n, b) in self.dtypes.items()},
            "largest": [{"name": s.name, "dtype": s.dtype, "shape": list(s.shape), "bytes": s.nbytes}
                        for s in self.largest],
            "quantized": vars(self.quantized) | {"names": list(self.quantized.names)},
            "kept": vars(self.kept) | {"names": list(self.kept.names)},
            "policy": self.policy,
            "kept_by": {r: vars(g) | {"names": list(g.names)} for r, g in self.kept_by.items()},
            "fp8_bytes": self.fp8_bytes, "scale_bytes": self.scale_bytes,
            "retained_bytes": self.retained_bytes,
            "stage_bytes": self.stage_bytes, "hold_bytes": self.hold_bytes, "prepass": self.prepass,
            "host_peak": self.host_peak, "host_terms": self.host_terms,
            "device_peak": self.device_peak, "device_terms": self.device_terms, "needed": self.needed(),
            "device_memory": device_memory,
            "fits": None if device_memory is None else self.fits(device_memory),
            "bytes_read": self.bytes_read, "kept_bytes": self.kept_bytes,
            "tp_rank": self.tp_rank, "tp_size": self.tp_size,
            "tp1": None if self.tp1 is None else {k: self.tp1.as_dict(device_memory)[k] for k in _TP1_KEYS},
        }

    def format(self, device_memory: int | None = None) -> str:
        o, g = self.options, lambda b: _size(b)
        terms = lambda d: " + ".join(f"{k} {g(v)}" for k, v in d.items() if v)  # noqa: E731
        few = lambda grp: f"  e.g. {', '.join(grp.names)}" if grp.names else ""  # noqa: E731
        tp = self.tp1 is not None
        share = " per rank" if tp else ""
        lines = [f"checkpoint   {self.path}: {len(self.shards)} shard(s), {self.tensors} tensors, "
                 f"{g(self.total_bytes)}"]
        lines += [f"  shard      {f}: {n} tensors, {g(b)}" for f, n, b in self.shards]
        lines += [f"  dtype      {d}: {n} tensors, {g(b)}" for d, (n, b) in sorted(self.dtypes.items())]
        lines += [f"  largest    {s.name} {s.dtype} {list(s.shape)}: {g(s.nbytes)}" for s in self.largest]
        lines += [
            f"quantized    {self.quantized.count} tensors, {g(self.quantized.nbytes)}{' in all' if tp else ''} -> FP8 "
            f"{g(self.fp8_bytes)} + scales {g(self.scale_bytes)}{share} ({o.granularity.value})"
            f"{few(self.quantized)}",
            f"kept         {self.kept.count} tensors, {g(self.kept.nbytes)}"
            + (f" ({g(self.kept_bytes)} per rank)" if tp else "") + f" (decided by {self.policy})",
            *(f"  {grp.count:>4} x    {rule}: {g(grp.nbytes)}{few(grp)}" for rule, grp in self.kept_by.items()),
            f"retained     {g(self.retained_bytes)}{share}",
            f"plan         ring {g(self.ring_bytes)} = {self.ring_bytes // o.slot_bytes} x {g(o.slot_bytes)} "
            f"slots, largest batch {g(self.stage_bytes)}" + (f", {self.prepass} scale groups read twice (amax pre-pass)"
                                       if self.prepass else ""),
            f"host peak    {g(self.host_peak)} above baseline ({terms(self.host_terms)})",
        ]
        if self.device_terms is not None:
            lines.append(f"device peak  {g(self.device_peak)} ({terms(self.device_terms)})")
        if tp:
            one = self.tp1
            lines.append(f"tensor par.  rank {self.tp_rank} of {self.tp_size} (every rank the same sizes) "
                         f"vs TP=1:")
            rows = [("bytes read", self.bytes_read, one.bytes_read),
                    ("retained", self.retained_bytes, one.retained_bytes),
                    ("host peak", self.host_peak, one.host_peak)]
            if self.device_terms is not None:
                rows.append(("device peak", self.device_peak, one.device_peak))
            lines += [f"  {k:<11}{g(a):>14} per rank  vs {g(b):>14}" for k, a, b in rows]
        if device_memory is not None:
            extra = "" if self.device_terms is None else (
                f" (device peak + CUDA context {g(CUDA_CONTEXT)} + margin {g(DEVICE_MARGIN)})")
            verdict = "fits" if self.fits(device_memory) else "does NOT fit"
            lines.append(f"{verdict:<12} {self.device}: needs {g(self.needed())}{extra} "
                         f"of {g(device_memory)}" + (" (each rank's device)" if tp else ""))
        return "\n".join(lines)


_TP1_KEYS = ("bytes_read", "fp8_bytes", "scale_bytes", "kept_bytes", "retained_bytes", "host_peak",
             "host_terms", "device_peak", "device_terms", "needed", "fits")


def _size(b: int) -> str:
    for unit, k in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if b >= 1 << k:
            return f"{b / (1 << k):,.2f} {unit}"
    return f"{b} B"


def _group(specs: list[TensorSpec]) -> TensorGroup:
    return TensorGroup(len(specs), sum(s.nbytes for s in specs), tuple(s.name for s in specs[:_NAMES]))


@public_verb
def estimate(path, device="cpu", *, top: int = 5, ring_bytes: int = RING_BYTES, fp8_dtype=torch.float8_e4m3fn,
             granularity="tensor", block_size=(128, 128), scale_dtype: str = "float32", skip=(), ignore=(),
             targets=None,
             policy: str = "auto", fp8_weight_scale: float | None = None, progress: bool = False,
             drop_page_cache: bool = True, error_stats: bool = False, keep_partial: bool = False,
             io: str = "mmap", read_threads: int | None = None,
             tp_size: int = 1, tp_rank: int | None = None, process_group=None, tp_plan=None,
             tp_timeout: float = 300.0) -> Projection:
    """Project a load of ``path`` onto ``device`` with these options; reads only headers.

    Args:
        path (`str` or `os.PathLike`): a ``.safetensors`` file, a sharded index, or a folder.
        device (`str`, default "cpu"): "cpu" or "cuda[:N]" (which need not exist here).
        top (`int`, default 5): how many of the largest tensors to name.
        ring_bytes, fp8_dtype, granularity, block_size, scale_dtype, skip, ignore, targets, policy,
            fp8_weight_scale, progress, drop_page_cache, error_stats, keep_partial, io, read_threads,
            tp_size, tp_rank, process_group, tp_plan, tp_timeout:
            the load options as for ``stream_quantize`` (``mmapload.LoadConfig``). With ``tp_size``
            > 1 the projection is rank ``tp_rank``'s (default 0; every rank has the same sizes),
            no process group needed; ``Projection.tp1`` is the same load at TP=1.

    Returns:
        `Projection`: the checkpoint's totals and the host / device memory the load needs, in bytes.
        (A TP rank: ``bytes_read``, FP8, scales, retained bytes and peaks are the rank's.)

    Raises:
        OptionsError: a bad option (naming it). What ``open_checkpoint`` raises. TPError: a tensor
            ``tp_size`` cannot cut (naming it and the fix).

    Example:

    ```python
    from mmapload.estimate import estimate

    print(estimate("path/to/checkpoint", "cuda:0", granularity="block").format())
    ```
    """
    opts = config_from(locals())
    dev = parse_device(device)
    ckpt = open_checkpoint(path)
    policy = policy_for(ckpt, opts)
    p = _project(ckpt, policy, opts, dev, top)
    if opts.tp_size > 1:   # the same load without tensor parallelism, next to the rank's
        one = LoadConfig(**{**opts.as_kwargs(), "tp_size": 1, "tp_rank": None, "process_group": None})
        p = dataclasses.replace(p, tp1=_project(ckpt, policy, one, dev, top))
    return p


def _project(ckpt, policy, opts: LoadOptions, dev, top: int) -> Projection:
    """The projection of loading ``ckpt`` with ``opts`` (a TP rank's: ``opts.tp_rank`` or 0)."""
    specs = ckpt.tensors
    quant = {s.name for s in specs if policy(s)}
    gran, (br, bc) = opts.granularity, opts.block_size
    plan = plan_load(ckpt, policy, opts, dev)
    shape = {s.name: plan.shape_of(s) for s in specs}    # the rank's part (TP), else the header's

    def local_nbytes(s: TensorSpec) -> int:   # sub-byte dtypes are never cut (tp_layout)
        return s.nbytes if s.name not in plan.slices else math.prod(shape[s.name]) * s.itemsize

    dtypes: dict[str, tuple[int, int]] = {}
    for s in specs:
        n, b = dtypes.get(s.dtype, (0, 0))
        dtypes[s.dtype] = (n + 1, b + s.nbytes)
    qspecs = [s for s in specs if s.name in quant]
    kspecs = [s for s in specs if s.name not in quant]
    by_rule: dict[str, list[TensorSpec]] = {}
    for s in kspecs:
        by_rule.setdefault(policy.decide(s).rule, []).append(s)
    numel = {s.name: math.prod(shape[s.name]) for s in qspecs}
    scale_elems = {s.name: math.prod(opts.scheme.scale_shape(shape[s.name])) for s in qspecs}
    scale_size = {s.name: opts.scale_dtype_of(s.torch_dtype).itemsize for s in qspecs}

    # from the plan: the largest piece and its amax grid, bands read out of file order
    piece_elems = grid_elems = band_rows = 0
    for batch in plan.batches:
        for p in batch.pieces:
            if not p.quantize:
                continue
            rows, cols = p.row1 - p.row0, p.col1 - p.col0
            if p.release_to < p.hi:   # read out of file order: a band cut into columns
                band_rows = max(band_rows, min(br, shape[p.spec.name][-2]))
            piece_elems = max(piece_elems, rows * cols)
            if gran is Granularity.BLOCK:   # int grid + its row padding + float copy
                grid_elems = max(grid_elems, (rows + br) * ceil_div(cols, bc))
            else:
                grid_elems = max(grid_elems, rows)
    stage, hold = plan.stage_bytes, plan.hold_bytes
    slot, ring = plan.slot_bytes, plan.n_slots * plan.slot_bytes   # the ring the load allocates
    grids, err = 20 * grid_elems, (12 * piece_elems if opts.error_stats else 0)
    fp8_bytes = sum(numel.values())
    scale_bytes = sum(scale_size[n] * e for n, e in scale_elems.items())
    kept_bytes = sum(local_nbytes(s) for s in kspecs)

    io = opts.io
    # mmap: a run's window, plus a pre-pass window where groups may be pre-passed (in place)
    reader = {"mmap": (1 if plan.copies else 2) * slot + 2 * _PAGE * band_rows, "pread": 0,
              "direct": len(ckpt.shards) * (slot + 2 * _PAGE)}[io]
    if dev.type == "cpu":
        prepass = len(plan.prepass)
        host = {"ring": ring, "retained": fp8_bytes + scale_bytes + kept_bytes,
                f"reader ({io})": reader, "quantizer scratch": 2 * _CPU_SCRATCH,
                "amax grids": 2 * grids, "error stats": err, "margin": HOST_MARGIN}
        device_terms = None
    else:
        prepass = 0
        host = {"ring (pinned)": 1 << (ring - 1).bit_length(), f"reader ({io})": reader,
                "quantizer scratch": _CPU_SCRATCH, "margin": HOST_MARGIN}
        retained = (sum(round_up(numel[s.name], _CUDA_ROUND) + round_up(scale_size[s.name] * scale_elems[s.name], _CUDA_ROUND)
                        for s in qspecs) + sum(round_up(local_nbytes(s), _CUDA_ROUND) for s in kspecs))
        device_terms = {"retained": retained, "staging": 2 * round_up(stage, _CUDA_ROUND),
                        "hold buffer": round_up(hold, _CUDA_ROUND), "quantizer scratch": _CUDA_SCRATCH,
                        "amax grids": grids, "error stats": err}
    return Projection(
        path=str(ckpt.root), device=str(dev), options=opts, total_bytes=ckpt.total_bytes,
        tensors=len(specs), shards=tuple((s.path.name, len(s.tensors), sum(t.nbytes for t in s.tensors))
                                         for s in ckpt.shards),
        dtypes=dtypes, largest=tuple(sorted(specs, key=lambda s: -s.nbytes)[:top]),
        quantized=_group(qspecs), kept=_group(kspecs), policy=policy.source,
        kept_by={r: _group(v) for r, v in sorted(by_rule.items(), key=lambda kv: -sum(x.nbytes for x in kv[1]))},
        fp8_bytes=fp8_bytes, scale_bytes=scale_bytes,
        ring_bytes=ring, stage_bytes=stage, hold_bytes=hold, prepass=prepass,
        host_terms=host, device_terms=device_terms, bytes_read=plan.total_bytes, kept_bytes=kept_bytes,
        tp_rank=plan.tp_rank, tp_size=plan.tp_size)
