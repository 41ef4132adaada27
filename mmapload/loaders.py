"""The loaders users compare, run one per fresh process and sampled by mmapload.profile.

Each strategy loads a checkpoint onto a device and quantizes its weights with the same FP8
quantizer, so only the loading differs:
- ``mmapload``: ``stream_quantize`` (the ring, any ``io`` mode);
- ``naive``: ``safetensors.torch.load_file`` of every shard, then quantize (vLLM's old path);
- ``safe_open``: ``safetensors.safe_open`` one tensor at a time (vLLM's default iterator).

``run_in_fresh_process(cfg)`` is what ``mmapload profile`` and tools/bench.py call.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import torch

__all__ = ["STRATEGIES", "run_in_fresh_process", "drop_cache"]

STRATEGIES = ("mmapload", "naive", "safe_open")
_FP8 = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}
_CHILD = "import sys; from mmapload.loaders import _child; sys.exit(_child(sys.stdin.read()))"


def run_in_fresh_process(cfg: dict) -> dict:
    """Run ``cfg["strategy"]`` in a new interpreter; its measurements as a dict.

    cfg: checkpoint, strategy, device, ring_bytes, fp8 ("e4m3"|"e5m2"), granularity, skip,
    io, interval (sampling seconds), progress, threads (torch threads or None).
    """
    proc = subprocess.run([sys.executable, "-c", _CHILD], input=json.dumps(cfg),
                          stdout=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"strategy {cfg['strategy']} failed (exit {proc.returncode}); see its stderr")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def drop_cache(paths) -> None:
    """Evict the files from the page cache (written-back pages only: fsync first)."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            try:
                os.fsync(fd)
            except OSError:
                pass
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _child(text: str) -> int:
    """One strategy in this fresh process: prints its samples and peaks as one JSON line."""
    import gc
    import safetensors.torch  # noqa: F401 - every strategy's imports come before the baseline
    from ._procmem import read_mem
    from .checkpoint import open_checkpoint
    from .device import resolve_device
    from .fp8 import quantize  # noqa: F401
    from .options import LoadOptions
    from .profile import MemorySampler, mark
    from .stream import stream_quantize  # noqa: F401
    cfg = json.loads(text)
    if cfg["threads"]:
        torch.set_num_threads(cfg["threads"])
    ckpt, dev = open_checkpoint(cfg["checkpoint"]), resolve_device(cfg["device"])
    opts = LoadOptions(ring_bytes=cfg["ring_bytes"], granularity=cfg["granularity"],
                       fp8_dtype=_FP8[cfg["fp8"]], skip=tuple(cfg["skip"]), io=cfg["io"],
                       progress=cfg["progress"])
    if dev.type == "cuda":   # the CUDA context belongs to the baseline, not to the load
        torch.zeros(1, device=dev)
        torch.cuda.synchronize(dev)
    gc.collect()
    base = read_mem()
    run = {"mmapload": _by_mmapload, "naive": _by_naive, "safe_open": _by_safe_open}[cfg["strategy"]]
    with MemorySampler(cfg["interval"], device=dev, files=[s.path for s in ckpt.shards]) as s:
        mark("open")
        t0 = time.perf_counter()
        kept, retained = run(ckpt, dev, opts)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        seconds = time.perf_counter() - t0
        mark("done")
    peaks = s.peaks()
    try:
        import resource
        unit = 1 if sys.platform == "darwin" else 1024   # bytes on macOS, KiB on Linux
        maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * unit
    except ImportError:
        maxrss = None
    print(json.dumps({
        "seconds": seconds, "baseline_rss": base.rss, "baseline_anon": base.anon,
        "baseline_file": base.file, **{f"peak_{m}": v for m, v in peaks.items()},
        "retained_bytes": retained, "ru_maxrss": maxrss, "markers": s.markers,
        "samples": [[getattr(x, f) for f in ("t", "rss", "anon", "file", "page_cache", "dev_alloc",
                                               "dev_reserved", "phase")] for x in s.samples]}))
    del kept
    return 0


def _by_mmapload(ckpt, dev, opts):
    from dataclasses import fields
    from .stream import stream_quantize
    model = stream_quantize(ckpt.root, dev, **{f.name: getattr(opts, f.name) for f in fields(opts)})
    return model, model.nbytes


def _keep(name, t, ckpt, dev, opts, keep: dict) -> int:
    """Quantize ``t`` (moved to ``dev``) as mmapload would; returns the bytes kept."""
    from .fp8 import quantize
    from .options import should_quantize
    from .profile import mark
    t = t.to(dev)
    if should_quantize(ckpt[name], opts):
        mark("quantize")
        keep[name] = q, s = quantize(t, opts.granularity, opts.fp8_dtype, opts.block_size, name=name)
        return q.numel() * q.element_size() + s.numel() * s.element_size()
    keep[name] = t
    return t.numel() * t.element_size()


def _by_naive(ckpt, dev, opts):
    """Every shard read whole into host RAM (safetensors.torch.load_file), then each weight
    moved to the device and quantized there: the plain "load, then quantize" path."""
    from safetensors.torch import load_file
    from ._progress import Progress
    from .profile import mark
    progress = Progress(2 * ckpt.total_bytes, enabled=opts.progress, desc="naive")
    mark("read")
    loaded = []
    for shard in ckpt.shards:
        loaded.append(load_file(shard.path))
        progress.update(sum(t.nbytes for t in shard.tensors))
    keep, retained = {}, 0
    for sd in loaded:
        for name, t in sd.items():
            retained += _keep(name, t, ckpt, dev, opts, keep)
            progress.update(ckpt[name].nbytes)
    progress.close()
    return keep, retained   # the loaded state dicts go once the model is built


def _by_safe_open(ckpt, dev, opts):
    """``safetensors.safe_open(shard, "pt", device=...)``, one tensor at a time, each
    quantized as it arrives; only the results are kept."""
    from safetensors import safe_open
    from ._progress import Progress
    from .profile import mark
    progress = Progress(ckpt.total_bytes, enabled=opts.progress, desc="safe_open")
    keep, retained = {}, 0
    mark("read")
    for shard in ckpt.shards:
        with safe_open(str(shard.path), "pt", device=str(dev)) as f:
            for name in f.keys():
                retained += _keep(name, f.get_tensor(name), ckpt, dev, opts, keep)
                progress.update(ckpt[name].nbytes)
    progress.close()
    return keep, retained


