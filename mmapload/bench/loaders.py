"""The loaders users compare, run one per fresh process and sampled by mmapload.bench.sampler.

The strategies themselves (what each one does): strategies.py.

``run_in_fresh_process(cfg)`` is what ``mmapload profile`` and tools/bench.py call.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import torch

from . import ALL_STRATEGIES, PEER_STRATEGIES, STRATEGIES
from .strategies import RUNNERS

__all__ = ["STRATEGIES", "PEER_STRATEGIES", "ALL_STRATEGIES", "PEER_PACKAGES", "StrategyError",
           "StrategyUnavailable", "run_in_fresh_process", "drop_cache"]

# strategy -> (module imported before the baseline, pip distribution that provides it)
PEER_PACKAGES = {"runai": ("runai_model_streamer", "runai-model-streamer"),
                 "runai_capped": ("runai_model_streamer", "runai-model-streamer"),
                 "fastsafetensors": ("fastsafetensors", "fastsafetensors"),
                 "fastsafetensors_capped": ("fastsafetensors", "fastsafetensors")}
_CHILD = "import sys; from mmapload.bench.loaders import _child; sys.exit(_child(sys.stdin.read()))"
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
    io, interval (sampling seconds), progress, threads (torch threads or None), read_threads
    (mmapload's, optional: None is automatic), policy (optional: "auto" | "model" | "names").
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
    from .._procmem import read_mem
    from ..checkpoint import open_checkpoint
    from ..transfer import resolve_device
    from ..fp8 import quantize  # noqa: F401
    from ..config import LoadOptions
    from .sampler import MemorySampler, mark
    from ..stream import stream_quantize  # noqa: F401
    if cfg["threads"]:
        torch.set_num_threads(cfg["threads"])
    ckpt, dev = open_checkpoint(cfg["checkpoint"]), resolve_device(cfg["device"])
    opts = LoadOptions(ring_bytes=cfg["ring_bytes"], granularity=cfg["granularity"],
                       fp8_dtype=cfg["fp8"], skip=tuple(cfg["skip"]), io=cfg["io"],
                       progress=cfg["progress"], read_threads=cfg.get("read_threads"),
                       policy=cfg.get("policy", "auto"))
    # Which tensors are quantized is decided before the clock starts, for every strategy alike:
    # the model of config.json is built once (a child process, seconds of imports) and remembered
    # in this process, so no loader's time includes it (stream_quantize then has nothing to guess).
    from ..decide import policy_for
    policy_for(ckpt, opts)
    if dev.type == "cuda":   # the CUDA context belongs to the baseline, not to the load
        torch.zeros(1, device=dev)
        torch.cuda.synchronize(dev)
    gc.collect()
    base = read_mem()
    run = RUNNERS[cfg["strategy"]]
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
