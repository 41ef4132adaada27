"""Memory over time: host RSS (anonymous / file-backed), the page cache held by given files,
device memory, and the phase the loader is in.

    with MemorySampler(interval=0.01, device="cuda:0", files=shard_paths) as s:
        model = stream_quantize(path, "cuda:0")
    s.samples, s.peak("rss"), s.peaks(), s.markers

A daemon thread samples every ``interval`` seconds, plus at start, stop and each phase change.
The page cache is ``cachestat`` of each file (Linux 6.5), else ``mincore`` over a never-touched
read-only map of it (nothing added to RSS): ``_pagecache.cached_bytes``. Both cost in proportion to the cached
pages (here cachestat 3.5 ms, mincore 22 ms per cached GiB: mincore every 0.1 s over a warm 4 GiB
checkpoint kept one of two cores busy and slowed every loader it watched 2-3x), so by default it is
sampled at most every 0.1 s and at most 2 % of a core, and carried in between. ``mark(phase)`` records a marker in every
running sampler (thread-safe; one tuple check when none runs; a repeated phase is ignored).
"""

from __future__ import annotations

import math
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable


from .. import phases
from .._procmem import read_mem
from .._pagecache import cached_bytes
from ..transfer import resolve_device
from ..errors import OptionsError

__all__ = ["Sample", "MemorySampler", "mark", "page_cache_bytes", "METRICS", "LABELS"]

METRICS = ("rss", "anon", "file", "page_cache", "dev_alloc", "dev_reserved")
LABELS = {"rss": "host RSS", "anon": "anonymous RSS", "file": "file-backed RSS",
          "page_cache": "checkpoint in page cache", "dev_alloc": "device allocated",
          "dev_reserved": "device reserved"}


@dataclass(frozen=True)
class Sample:
    """One reading; bytes, or None where the platform / device cannot tell."""

    t: float                    # seconds since the sampler started
    rss: int
    anon: int | None            # anonymous resident bytes (heap, ring, tensors)
    file: int | None            # file-backed resident bytes (mapped shards, libraries)
    page_cache: int | None      # bytes of the sampled files resident in the page cache
    dev_alloc: int | None       # torch.cuda.memory_allocated
    dev_reserved: int | None    # torch.cuda.memory_reserved
    phase: str                  # the last marked phase ("" before the first)


mark = phases.mark   # records a phase in every running sampler (the core marks through phases.py)


class _CacheProbe:
    """Bytes of some files resident in the page cache (``_pagecache.cached_bytes``); each file
    stays open, never mapped or read, while the probe lives."""

    def __init__(self, paths: list[Path]):
        self._files: list[tuple[int, int]] = []   # fd, size
        try:
            for path in paths:
                fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
                try:
                    size = os.fstat(fd).st_size
                except BaseException:
                    os.close(fd)
                    raise
                self._files.append((fd, size))
        except BaseException:
            self.close()
            raise

    def resident(self) -> int | None:
        """Bytes of the files in the page cache; None where the kernel will not tell (a file we
        neither own nor may write: its mincore answers "all resident")."""
        total = 0
        for fd, size in self._files:
            n = cached_bytes(fd, size)
            if n is None:
                return None
            total += n
        return total

    def close(self) -> None:
        for fd, _ in self._files:
            os.close(fd)
        self._files = []


def page_cache_bytes(files: Iterable[str | os.PathLike]) -> int | None:
    """Bytes of ``files`` resident in the page cache right now (cachestat, or mincore; Unix only);
    None where the kernel will not tell (``_CacheProbe.resident``)."""
    probe = _CacheProbe(_expand(files))
    try:
        return probe.resident()
    finally:
        probe.close()


def _expand(files: Iterable[str | os.PathLike] | str | os.PathLike) -> list[Path]:
    """Paths; a folder stands for the ``*.safetensors`` files directly inside it."""
    if isinstance(files, (str, os.PathLike)):
        files = [files]
    out: list[Path] = []
    for f in files:
        p = Path(f)
        out += sorted(p.glob("*.safetensors")) if p.is_dir() else [p]
    return out


def _cuda(device):
    """``torch.device`` of a CUDA device to watch, or None for the CPU / no device."""
    if device is None or str(device) == "cpu":
        return None
    dev = resolve_device(device)   # DeviceError for anything that is not cpu or a usable cuda[:N]
    return None if dev.type == "cpu" else dev


class _Ticker(threading.Thread):
    def __init__(self, sampler: "MemorySampler"):
        super().__init__(name="mmapload-sampler", daemon=True)
        self.sampler = sampler

    def run(self) -> None:
        self.sampler._loop()


class MemorySampler:
    """Sample process memory in a background thread while the ``with`` body runs.

    ``files``: paths (a folder: its ``*.safetensors``) whose page-cache residency is
    sampled; none: ``page_cache`` is None. ``device``: "cuda[:N]" to sample its memory.
    A sampler runs once; ``samples`` and ``markers`` stay readable after it stops.
    """

    def __init__(self, interval: float = 0.01, device=None, files=(), cache_interval: float | None = None):
        for name, v, low in (("interval", interval, 1e-4), ("cache_interval", cache_interval, 0.0)):
            if v is None and name == "cache_interval":
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < low:
                raise OptionsError(f"{name} must be a number of seconds >= {low}, got {v!r}")
        self.interval = float(interval)
        # None: every 0.1 s, or 50x as long as the last probe took (<= 2 % of a core)
        self.cache_interval = None if cache_interval is None else float(cache_interval)
        self._cache_every = 0.1 if cache_interval is None else float(cache_interval)
        self.device = _cuda(device)
        self.files = _expand(files)
        self.samples: list[Sample] = []
        self.markers: list[tuple[float, str]] = []
        self.error: BaseException | None = None   # what stopped the sampling thread, if anything
        self._phase, self._cache, self._cache_at = "", None, -math.inf
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: _Ticker | None = None
        self._probe: _CacheProbe | None = None
        self._t0 = 0.0

    # -- lifecycle ---------------------------------------------------------------------
    def start(self) -> "MemorySampler":
        if self._thread is not None:
            raise RuntimeError("a MemorySampler runs once; make a new one")
        if self.files:
            self._probe = _CacheProbe(self.files)
        self._t0 = time.perf_counter()
        self._thread = _Ticker(self)
        self._take(cache=True)
        phases.listen(self._mark)
        self._thread.start()
        return self

    def stop(self) -> None:
        phases.unlisten(self._mark)
        if self._thread is None or self._stop.is_set():
            return
        self._stop.set()
        self._thread.join()
        try:
            if self.error is None:
                self._take(cache=True)
        finally:
            if self._probe is not None:
                self._probe.close()

    def __enter__(self) -> "MemorySampler":
        return self.start()

    def __exit__(self, exc_type, exc, tb) -> None:
        self.stop()
        if self.error is not None and exc_type is None:
            raise self.error

    # -- sampling ----------------------------------------------------------------------
    def _loop(self) -> None:
        try:
            while not self._stop.wait(self.interval):
                now = time.perf_counter()
                self._take(cache=now - self._cache_at >= self._cache_every)
        except BaseException as e:  # noqa: BLE001 - re-raised by __exit__
            self.error = e

    def _take(self, cache: bool) -> None:
        if cache and self._probe is not None:
            self._cache_at = time.perf_counter()
            self._cache = self._probe.resident()
            if self.cache_interval is None:
                self._cache_every = max(0.1, 50 * (time.perf_counter() - self._cache_at))
        alloc = reserved = None
        if self.device is not None:
            import torch
            alloc = torch.cuda.memory_allocated(self.device)
            reserved = torch.cuda.memory_reserved(self.device)
        with self._lock:  # t and phase under the lock: samples stay in time order
            m = read_mem()
            self.samples.append(Sample(time.perf_counter() - self._t0, m.rss, m.anon, m.file,
                                       self._cache, alloc, reserved, self._phase))

    def _mark(self, phase: str) -> None:
        with self._lock:
            if phase == self._phase:
                return
            self._phase = phase
            self.markers.append((time.perf_counter() - self._t0, phase))
        self._take(cache=False)

    # -- results -----------------------------------------------------------------------
    def peak(self, metric: str = "rss") -> int | None:
        """Largest value of ``metric`` (one of METRICS) over the samples; None if never known."""
        if metric not in METRICS:
            raise OptionsError(f"unknown metric {metric!r}; use one of {', '.join(METRICS)}")
        vals = [v for s in self.samples if (v := getattr(s, metric)) is not None]
        return max(vals) if vals else None

    def peaks(self) -> dict[str, int | None]:
        return {m: self.peak(m) for m in METRICS}
