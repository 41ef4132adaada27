"""The loaders users compare, run one per fresh process and sampled by mmapload.profile.

Each strategy loads a checkpoint onto a device and quantizes its weights with the same FP8
quantizer, so only the loading differs:
- ``mmapload``: ``stream_quantize`` (the ring, any ``io`` mode);
- ``naive``: ``safetensors.torch.load_file`` of every shard, then quantize (vLLM's old path);
- ``safe_open``: ``safetensors.safe_open`` one tensor at a time (vLLM's default iterator).

Peers, optional (``pip install mmapload[bench]``); without the package a run raises
``StrategyUnavailable``:
- ``runai``: Run:ai Model Streamer's ``SafetensorsStreamer`` with its defaults (memory limit
  ``RUNAI_STREAMER_MEMORY_LIMIT`` unset: 40 GB, so the whole checkpoint is buffered);
- ``runai_capped``: the same with ``RUNAI_STREAMER_MEMORY_LIMIT`` = ``ring_bytes``, raised to
  the largest tensor when the ring is smaller (the streamer refuses a limit below it; the
  result's ``note`` says so);
- ``fastsafetensors``: ``SafeTensorsFileLoader(nogds=True)``, one shard at a time, as vLLM's
  fastsafetensors iterator does (whole shard in one host / device buffer);
- ``fastsafetensors_capped``: its ``ParallelLoader`` with ``max_batch_bytes=ring_bytes``
  (each shard loaded in sub-file chunks of at most that span; raised to the largest tensor
  like ``runai_capped``).

``run_in_fresh_process(cfg)`` is what ``mmapload profile`` and tools/bench.py call.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import torch

__all__ = ["STRATEGIES", "PEER_STRATEGIES", "ALL_STRATEGIES", "PEER_PACKAGES", "StrategyError",
           "StrategyUnavailable", "run_in_fresh_process", "drop_cache"]

# STRATEGIES need nothing beyond our own dependencies: what `mmapload profile` runs by default.
# PEER_STRATEGIES need an optional package each; run_in_fresh_process takes ALL_STRATEGIES.
STRATEGIES = ("mmapload", "naive", "safe_open")
PEER_STRATEGIES = ("runai", "runai_capped", "fastsafetensors", "fastsafetensors_capped")
ALL_STRATEGIES = STRATEGIES + PEER_STRATEGIES
# strategy -> (module imported before the baseline, pip distribution that provides it)
PEER_PACKAGES = {"runai": ("runai_model_streamer", "runai-model-streamer"),
                 "runai_capped": ("runai_model_streamer", "runai-model-streamer"),
                 "fastsafetensors": ("fastsafetensors", "fastsafetensors"),
                 "fastsafetensors_capped": ("fastsafetensors", "fastsafetensors")}
_FP8 = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}
_CHILD = "import sys; from mmapload.loaders import _child; sys.exit(_child(sys.stdin.read()))"
_RESULT = "@mmapload-result "     # prefix of the child's one result line on stdout
_EXIT_UNAVAILABLE = 3


class StrategyError(RuntimeError):
    """A strategy's process failed; ``reason`` says why (the child's exception, or its signal)."""

    def __init__(self, strategy: str, reason: str, returncode: int | None = None):
        super().__init__(f"strategy {strategy} failed: {reason}")
        self.strategy, self.reason, self.returncode = strategy, reason, returncode


class StrategyUnavailable(StrategyError):
    """The strategy's package is not installed (or cannot be imported) here."""

    def __init__(self, strategy: str, reason: str, returncode: int | None = None):
        RuntimeError.__init__(self, f"strategy {strategy} is unavailable: {reason}")
        self.strategy, self.reason, self.returncode = strategy, reason, returncode


def run_in_fresh_process(cfg: dict, timeout: float | None = None) -> dict:
    """Run ``cfg["strategy"]`` in a new interpreter; its measurements as a dict.

    cfg: checkpoint, strategy, device, ring_bytes, fp8 ("e4m3"|"e5m2"), granularity, skip,
    io, interval (sampling seconds), progress, threads (torch threads or None).
    The child's stderr passes through. Raises ``StrategyUnavailable`` when a peer's package
    is missing, ``StrategyError`` (a RuntimeError) when the child fails, is killed (an
    out-of-memory kill reads as signal 9) or runs past ``timeout`` seconds.
    """
    name = cfg["strategy"]
    try:
        proc = subprocess.run([sys.executable, "-c", _CHILD], input=json.dumps(cfg),
                              stdout=subprocess.PIPE, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise StrategyError(name, f"timed out after {timeout:g} s") from None
    result = None
    for line in reversed(proc.stdout.splitlines()):   # peers may print to stdout too
        if line.startswith(_RESULT):
            result = json.loads(line[len(_RESULT):])
            break
    if proc.returncode == 0 and result is not None and "error" not in result:
        return result
    if result is not None and "error" in result:
        cls = StrategyUnavailable if proc.returncode == _EXIT_UNAVAILABLE else StrategyError
        raise cls(name, result["error"], proc.returncode)
    if proc.returncode < 0:
        reason = f"killed by signal {-proc.returncode}" + (" (out of memory?)" if proc.returncode == -9 else "")
    else:
        reason = f"exit {proc.returncode} without a result; see its stderr"
    raise StrategyError(name, reason, proc.returncode)


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
    """One strategy in this fresh process: prints its samples and peaks as one JSON line
    (prefixed by ``_RESULT``), or ``{"error": ...}`` and a non-zero exit."""
    cfg = json.loads(text)
    name = cfg["strategy"]
    if name not in ALL_STRATEGIES:
        return _fail(f"unknown strategy {name!r}; known: {', '.join(ALL_STRATEGIES)}", 2)
    if name in PEER_PACKAGES:
        module, dist = PEER_PACKAGES[name]
        if name.startswith("runai"):   # its Python logs to stderr, never into our stdout
            os.environ.setdefault("RUNAI_STREAMER_LOG_TO_STDERR", "1")
        try:
            __import__(module)   # before the baseline, like every strategy's imports
        except Exception as e:  # noqa: BLE001 - ImportError, or a broken native library
            return _fail(f"cannot import {module} ({type(e).__name__}: {e}); pip install {dist} "
                         "(or mmapload[bench])", _EXIT_UNAVAILABLE)
    try:
        return _measure(cfg)
    except Exception as e:  # noqa: BLE001 - reported to the parent, traceback on stderr
        import traceback
        traceback.print_exc()
        return _fail(f"{type(e).__name__}: {e}", 1)


def _fail(reason: str, code: int) -> int:
    print(_RESULT + json.dumps({"error": reason}), flush=True)
    return code


def _measure(cfg: dict) -> int:
    import gc
    import safetensors.torch  # noqa: F401 - every strategy's imports come before the baseline
    from ._procmem import read_mem
    from .checkpoint import open_checkpoint
    from .device import resolve_device
    from .fp8 import quantize  # noqa: F401
    from .options import LoadOptions
    from .profile import MemorySampler, mark
    from .stream import stream_quantize  # noqa: F401
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
    run = {"mmapload": _by_mmapload, "naive": _by_naive, "safe_open": _by_safe_open, "runai": _by_runai,
           "runai_capped": _by_runai_capped, "fastsafetensors": _by_fastsafetensors,
           "fastsafetensors_capped": _by_fastsafetensors_capped}[cfg["strategy"]]
    notes: list[str] = []
    with MemorySampler(cfg["interval"], device=dev, files=[s.path for s in ckpt.shards]) as s:
        mark("open")
        t0 = time.perf_counter()
        kept, retained = run(ckpt, dev, opts, notes)
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
    print(_RESULT + json.dumps({
        "seconds": seconds, "threads": torch.get_num_threads(), "note": "; ".join(notes),
        "baseline_rss": base.rss, "baseline_anon": base.anon,
        "baseline_file": base.file, **{f"peak_{m}": v for m, v in peaks.items()},
        "retained_bytes": retained, "ru_maxrss": maxrss, "markers": s.markers,
        "samples": [[getattr(x, f) for f in ("t", "rss", "anon", "file", "page_cache", "dev_alloc",
                                               "dev_reserved", "phase")] for x in s.samples]}), flush=True)
    del kept
    return 0


def _by_mmapload(ckpt, dev, opts, notes):
    from dataclasses import fields
    from .stream import stream_quantize
    model = stream_quantize(ckpt.root, dev, **{f.name: getattr(opts, f.name) for f in fields(opts)})
    return model, model.nbytes


def _keep(name, t, ckpt, dev, opts, keep: dict) -> int:
    """Quantize ``t`` (moved to ``dev``) as mmapload would; returns the bytes kept."""
    from .fp8 import quantize
    from .options import should_quantize
    from .profile import mark
    if should_quantize(ckpt[name], opts):
        t = t.to(dev)
        mark("quantize")
        keep[name] = q, s = quantize(t, opts.granularity, opts.fp8_dtype, opts.block_size, name=name)
        return q.numel() * q.element_size() + s.numel() * s.element_size()
    # an owned copy, as an engine copies into its parameters: a view would keep the loader's
    # buffer (a whole shard's map, a streamer's ring buffer) alive after the load
    keep[name] = t = t.to(dev, copy=True)
    return t.numel() * t.element_size()


def _by_naive(ckpt, dev, opts, notes):
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


def _by_safe_open(ckpt, dev, opts, notes):
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




def _consume(pairs, ckpt, dev, opts, desc: str):
    """Quantize every (name, tensor) of a peer's iterator as it arrives; keep only the results."""
    from ._progress import Progress
    from .profile import mark
    progress = Progress(ckpt.total_bytes, enabled=opts.progress, desc=desc)
    keep, retained = {}, 0
    mark("read")
    for name, t in pairs:
        retained += _keep(name, t, ckpt, dev, opts, keep)
        progress.update(ckpt[name].nbytes)
        del t   # the peer's buffer may go as soon as we are done with it
        mark("read")
    progress.close()
    if len(keep) != len(ckpt.tensors):
        raise RuntimeError(f"{desc} delivered {len(keep)} of {len(ckpt.tensors)} tensors")
    return keep, retained


def _runai_pairs(ckpt):
    from runai_model_streamer import SafetensorsStreamer
    with SafetensorsStreamer() as streamer:
        streamer.stream_files([str(s.path) for s in ckpt.shards])   # to host memory, as vLLM does
        yield from streamer.get_tensors()


def _by_runai(ckpt, dev, opts, notes):
    """Run:ai Model Streamer with its defaults: C++ reader threads into one host buffer
    sized by ``RUNAI_STREAMER_MEMORY_LIMIT`` (unset: 40 GB, i.e. the whole checkpoint here)."""
    limit = os.environ.get("RUNAI_STREAMER_MEMORY_LIMIT")
    notes.append("memory limit: default (40 GB)" if limit is None else f"RUNAI_STREAMER_MEMORY_LIMIT={limit} "
                 "from the environment")
    return _consume(_runai_pairs(ckpt), ckpt, dev, opts, "runai")


def _by_runai_capped(ckpt, dev, opts, notes):
    """Run:ai Model Streamer with ``RUNAI_STREAMER_MEMORY_LIMIT`` = our ring (or the largest
    tensor, the smallest limit it accepts, when the ring is smaller)."""
    largest = max((t.nbytes for t in ckpt.tensors), default=0)
    limit = max(opts.ring_bytes, largest)
    os.environ["RUNAI_STREAMER_MEMORY_LIMIT"] = str(limit)   # read when streaming starts
    notes.append(f"memory limit {limit} B" + (
        "" if limit == opts.ring_bytes else f" = the largest tensor (runai refuses less; the ring is "
                                             f"{opts.ring_bytes} B)"))
    return _consume(_runai_pairs(ckpt), ckpt, dev, opts, "runai_capped")


def _fst_device(dev) -> str:
    return "cpu" if dev.type == "cpu" else f"cuda:{dev.index if dev.index is not None else 0}"


def _fst_pairs(ckpt, dev):
    """vLLM's fastsafetensors iterator with one process: one shard at a time, copied whole
    into a host (CPU) or device buffer by ``nogds`` bounce-buffer reads, then yielded."""
    from fastsafetensors import SafeTensorsFileLoader
    for shard in ckpt.shards:
        loader = SafeTensorsFileLoader(None, _fst_device(dev), nogds=True)
        try:
            loader.add_filenames({0: [str(shard.path)]})
            fb = loader.copy_files_to_device()
            try:
                for name in list(fb.key_to_rank_lidx.keys()):
                    yield name, fb.get_tensor(name)
            finally:
                fb.close()
        finally:
            loader.close()


def _by_fastsafetensors(ckpt, dev, opts, notes):
    notes.append("nogds=True, one shard per batch")
    return _consume(_fst_pairs(ckpt, dev), ckpt, dev, opts, "fastsafetensors")


def _by_fastsafetensors_capped(ckpt, dev, opts, notes):
    """fastsafetensors' ParallelLoader with ``max_batch_bytes`` = our ring (or the largest
    tensor, the smallest span it accepts): each shard read in sub-file chunks."""
    from fastsafetensors import ParallelLoader
    largest = max((t.nbytes for t in ckpt.tensors), default=0)
    limit = max(opts.ring_bytes, largest)
    notes.append(f"nogds=True, ParallelLoader max_batch_bytes={limit}" + (
        "" if limit == opts.ring_bytes else f" = the largest tensor (it refuses less; the ring is "
                                             f"{opts.ring_bytes} B)"))
    pl = ParallelLoader(None, [str(s.path) for s in ckpt.shards], device=_fst_device(dev), nogds=True,
                        max_batch_bytes=limit, use_tqdm_on_load=False)
    try:
        it = pl.iterate_weights()
        try:
            return _consume(it, ckpt, dev, opts, "fastsafetensors_capped")
        finally:
            it.close()
    finally:
        pl.close()
