#!/usr/bin/env python
"""Benchmark mmapload against the loaders people use, on generated llama-shaped checkpoints.

Every strategy loads the same checkpoint and quantizes its weights with the same FP8
quantizer (mmapload.fp8), so only the loading differs; each runs in a fresh process
(mmapload.bench.loaders.run_in_fresh_process) that samples its own memory:

    naive                    safetensors.torch.load_file of every shard, then quantize
    safe_open                safetensors.safe_open, one tensor at a time
    runai                    Run:ai Model Streamer (SafetensorsStreamer), its default memory limit
    runai_capped             the same, RUNAI_STREAMER_MEMORY_LIMIT = the ring (>= the largest tensor)
    fastsafetensors          SafeTensorsFileLoader(nogds=True), one shard at a time (vLLM's iterator)
    fastsafetensors_capped   its ParallelLoader, max_batch_bytes = the ring (>= the largest tensor)
    mmapload:mmap|pread|direct|view   stream_quantize with each io mode

Peers are optional (pip install -e ".[bench]"); a missing or failing peer is reported as
skipped with the reason. A "ceiling" is measured in every run: a raw sequential read of the
same bytes (buffered readinto warm, O_DIRECT cold), the quantize-only time of the checkpoint's
quantizable weights already in memory (and, on CUDA, the pinned host->device copy rate);
ceiling seconds = the slowest of those stages, which no pipeline can beat.

Page cache: warm (default) reads the shards once before each run; --cold drops them before
each run (echo 3 > /proc/sys/vm/drop_caches where permitted, else posix_fadvise DONTNEED).

    python tools/bench.py                           # 4 GiB checkpoint, CPU, warm, all strategies
    python tools/bench.py --cold --threads 1 --json out.json
    python tools/bench.py --sizes 1GiB,4GiB --strategies naive,mmapload
    python tools/bench.py --quick                   # ~64 MiB, a few strategies, well under a minute
    python tools/bench.py --tp 2,4 --sizes 1GiB     # tensor parallel: N gloo ranks, per-rank numbers
    python tools/bench.py --convert --granularity channel --llmc-python VENV/bin/python   # vs model_free_ptq

--tp N (tools/bench_tp.py): for each strategy N fresh ranks (gloo on 127.0.0.1) each load their
slice: "safe_open" (every rank get_tensor's every tensor and narrows it, as engines do) against
mmapload:IO (tp_size=N); per rank seconds, CPU seconds, bytes read, storage reads
(/proc/self/io), peak RSS (anon / file-backed), bytes kept; --row-weight RxC loads one
row-parallel weight instead of the llama checkpoint.

Output: a markdown table per size on stdout (seconds, GB/s of checkpoint bytes, time as a
multiple of the ceiling and of mmapload:mmap, peak RSS / anonymous / file-backed above the
process's baseline, peak device memory), a growth table when several sizes are given, and
the same numbers as JSON (--json FILE) with the machine's description.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import math
import mmap
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import psutil
import torch

from mmapload._procmem import fstype

from mmapload.checkpoint import open_checkpoint
from mmapload.dtypes import DTYPES, FP8
from mmapload.cli import parse_size
from mmapload.fp8 import Quantizer
from mmapload.bench.loaders import (ALL_STRATEGIES, PEER_PACKAGES, STRATEGIES, StrategyError,
                              StrategyUnavailable, drop_cache, run_in_fresh_process)
from mmapload.config import IO_MODES, LoadOptions
from mmapload.decide import policy_for
from mmapload.bench.sampler import page_cache_bytes
from mmapload.synth import llama_layout, make_llama_checkpoint

MiB, GiB = 1 << 20, 1 << 30
FP8_BY_NAME = {n.removeprefix("F8_").lower(): DTYPES[n] for n in FP8}   # e4m3, e5m2
ALL_ROWS = [("naive", None), ("safe_open", None), ("runai", None), ("runai_capped", None),
            ("fastsafetensors", None), ("fastsafetensors_capped", None),
            *(("mmapload", io) for io in IO_MODES)]
QUICK_ROWS = [("naive", None), ("safe_open", None), ("runai_capped", None),
              ("mmapload", "mmap"), ("mmapload", "direct")]
QUICK_SIZE, QUICK_RING = 64 * MiB, 16 * MiB
REFERENCE = ("mmapload", "mmap")        # the "x mmapload" column divides by this row
READ_CHUNK = 16 * MiB


def label(row: tuple[str, str | None]) -> str:
    return row[0] if row[1] is None else f"{row[0]}:{row[1]}"


def parse_strategies(text: str) -> list[tuple[str, str | None]]:
    """'naive,mmapload:direct,runai' -> rows; plain 'mmapload' means every io mode."""
    rows: list[tuple[str, str | None]] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        name, _, io = part.partition(":")
        if name not in ALL_STRATEGIES:
            raise argparse.ArgumentTypeError(f"unknown strategy {name!r}; choose from {', '.join(ALL_STRATEGIES)} "
                                             f"(mmapload:IO with IO in {', '.join(IO_MODES)})")
        if name == "mmapload":
            if io and io not in IO_MODES:
                raise argparse.ArgumentTypeError(f"unknown io mode {io!r}; choose from {', '.join(IO_MODES)}")
            new = [("mmapload", io)] if io else [("mmapload", m) for m in IO_MODES]
        elif io:
            raise argparse.ArgumentTypeError(f"only mmapload takes an io mode, got {part!r}")
        else:
            new = [(name, None)]
        rows += [r for r in new if r not in rows]
    if not rows:
        raise argparse.ArgumentTypeError("no strategies given")
    return rows


def parse_sizes(text: str) -> list[int]:
    sizes = [parse_size(s) for s in text.split(",") if s.strip()]
    if not sizes or any(s < 4 * MiB for s in sizes):
        raise argparse.ArgumentTypeError(f"sizes must be >= 4MiB, got {text!r}")
    return sorted(set(sizes))


def size_name(n: int) -> str:
    for unit, div in (("GiB", GiB), ("MiB", MiB)):
        if n >= div and n % (div // 4) == 0:
            v = n / div
            return f"{v:g}{unit}"
    return f"{n}B"


# -- the machine -------------------------------------------------------------------------------
def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(device: torch.device, cache: str, cold_method: str | None) -> dict:
    versions = {}
    for dist in ["torch", "safetensors", "numpy", *sorted({d for _, d in PEER_PACKAGES.values()})]:
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = None
    return {
        "cpu": cpu_name(), "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "ram_bytes": psutil.virtual_memory().total, "kernel": platform.release(),
        "python": platform.python_version(), "versions": versions,
        "torch_default_threads": torch.get_num_threads(),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
        "cache": cache, "cold_method": cold_method,
        "loadavg_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


# -- page cache --------------------------------------------------------------------------------
def probe_cold_method(prefer: str) -> str:
    """'drop_caches' when /proc/sys/vm/drop_caches can be written (tried once), else 'fadvise'."""
    if prefer == "fadvise":
        return "fadvise"
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return "drop_caches"
    except OSError as e:
        if prefer == "drop_caches":
            raise SystemExit(f"bench: cannot write /proc/sys/vm/drop_caches: {e}")
        return "fadvise"


def make_cold(paths: list[str], method: str) -> None:
    if method == "drop_caches":
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    else:
        drop_cache(paths)


def make_warm(paths: list[str]) -> None:
    buf = bytearray(READ_CHUNK)
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass


def prepare(paths: list[str], cold: str | None) -> int:
    """Warm or cold page cache for the next run; returns the shards' bytes then cached."""
    if cold:
        make_cold(paths, cold)
    else:
        make_warm(paths)
    return page_cache_bytes(paths)


# -- the ceiling -------------------------------------------------------------------------------
def read_seconds(paths: list[str], cold: str | None) -> tuple[float, str, float]:
    """Seconds of one sequential pass over the shards, how they were read, and its CPU seconds."""
    how = "buffered readinto"
    flags = os.O_RDONLY
    if cold:
        make_cold(paths, cold)
        flags |= getattr(os, "O_DIRECT", 0)
        how = "O_DIRECT pread" if flags & getattr(os, "O_DIRECT", 0) else "buffered pread (no O_DIRECT)"
    else:
        make_warm(paths)
    buf = mmap.mmap(-1, READ_CHUNK)      # page-aligned: what O_DIRECT needs
    view = memoryview(buf)
    total = 0
    t0, c0 = time.perf_counter(), time.process_time()
    try:
        for p in paths:
            try:
                fd = os.open(p, flags)
            except OSError:                  # a filesystem without O_DIRECT (tmpfs)
                fd = os.open(p, os.O_RDONLY)
                how = "buffered pread (O_DIRECT refused)"
            try:
                off = 0
                while True:
                    try:
                        n = os.preadv(fd, [view], off)
                    except OSError:          # O_DIRECT open but unaligned tail refused
                        os.close(fd)
                        fd = os.open(p, os.O_RDONLY)
                        n = os.preadv(fd, [view], off)
                    if n <= 0:
                        break
                    off += n
                    total += n
            finally:
                os.close(fd)
    finally:
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
        view.release()
        buf.close()
    expected = sum(os.path.getsize(p) for p in paths)
    if total != expected:
        raise RuntimeError(f"read {total} of {expected} bytes")
    return seconds, how, cpu


def quantize_seconds(ckpt, device: torch.device, opts: LoadOptions) -> tuple[float, dict]:
    """Quantize-only seconds over every quantizable weight, each already in (device) memory.

    One weight at a time is read into memory (not timed) and quantized (timed: amax, scale,
    saturating cast, the FP8 output's allocation), as mmapload's Quantizer does in the pipeline.
    """
    from safetensors import safe_open
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    quantizer = Quantizer(opts.fp8_dtype, opts.granularity, opts.block_size, device=device)
    warm = torch.randn(256, 512).to(torch.bfloat16).to(device)
    quantizer.quantize(warm)              # scratch and kernels warmed outside the timing
    sync()
    seconds, cpu, count, nbytes = 0.0, 0.0, 0, 0
    by_shard: dict = {}
    policy = policy_for(ckpt, opts)
    for spec in ckpt.tensors:
        if policy(spec):
            by_shard.setdefault(spec.shard, []).append(spec.name)
    for shard_path, names in by_shard.items():
        with safe_open(str(shard_path), "pt", device="cpu") as f:
            for name in names:
                w = f.get_tensor(name).to(device, copy=True)   # in memory, off the map
                sync()
                t0, c0 = time.perf_counter(), time.process_time()
                q, s = quantizer.quantize(w, name=name)
                sync()
                seconds += time.perf_counter() - t0
                cpu += time.process_time() - c0   # every thread of this process (torch's intra-op ones)
                count += 1
                nbytes += w.numel() * w.element_size()
                del w, q, s
    return seconds, {"tensors": count, "bytes": nbytes, "cpu_seconds": cpu,
                     "basis": f"all {count} quantizable weights ({nbytes / GiB:.2f} GiB), each already "
                              "in memory, timed one at a time (measured, not extrapolated)"}


def h2d_seconds(total_bytes: int, device: torch.device) -> tuple[float, str]:
    """Seconds to copy ``total_bytes`` host->device from pinned memory (rate measured on
    repeated 256 MiB copies, extrapolated to the checkpoint's bytes)."""
    n = min(256 * MiB, max(MiB, total_bytes))
    src = torch.empty(n, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty(n, dtype=torch.uint8, device=device)
    dst.copy_(src, non_blocking=True)
    torch.cuda.synchronize(device)
    reps = max(4, min(16, math.ceil(total_bytes / n)))
    t0 = time.perf_counter()
    for _ in range(reps):
        dst.copy_(src, non_blocking=True)
    torch.cuda.synchronize(device)
    rate = reps * n / (time.perf_counter() - t0)
    del src, dst
    return total_bytes / rate, f"pinned {n // MiB} MiB copies x {reps}, {rate / 1e9:.2f} GB/s, extrapolated"


def ceiling(ckpt, paths, device, opts, cold) -> dict:
    total = ckpt.total_bytes
    stages = {}
    r_s, r_how, r_cpu = read_seconds(paths, cold)
    stages["read"] = {"seconds": r_s, "how": r_how, "cpu_seconds": r_cpu}
    q_s, q_info = quantize_seconds(ckpt, device, opts)
    stages["quantize"] = {"seconds": q_s, "how": q_info["basis"], "bytes": q_info["bytes"],
                          "tensors": q_info["tensors"], "cpu_seconds": q_info["cpu_seconds"]}
    if device.type == "cpu":
        # on the CPU the read and the quantizer share the cores: overlapping them cannot beat the CPU
        # time both need, spread over every core this process may run on
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        stages["cpu"] = {"seconds": (r_cpu + q_info["cpu_seconds"]) / cores, "cores": cores,
                         "how": f"(read {r_cpu:.2f} + quantize {q_info['cpu_seconds']:.2f} CPU s) / {cores} cores"}
    if device.type == "cuda":
        h_s, h_how = h2d_seconds(total, device)
        stages["h2d"] = {"seconds": h_s, "how": h_how}
    slowest = max(stages, key=lambda k: stages[k]["seconds"])
    return {"seconds": stages[slowest]["seconds"], "slowest": slowest, "stages": stages,
            "gbps": total / stages[slowest]["seconds"] / 1e9}


# -- one size ----------------------------------------------------------------------------------
def checkpoint_for(size: int, root: Path) -> tuple[Path, bool]:
    """The checkpoint of ``size`` under root: reused when one of that layout is there."""
    path = root / f"llama-{size_name(size)}"
    config, _ = llama_layout(size)
    try:
        if json.loads((path / "config.json").read_text()) == config:
            open_checkpoint(path)          # headers and sizes validate
            return path, True
    except (OSError, ValueError):
        pass
    if path.exists():
        shutil.rmtree(path)
    return make_llama_checkpoint(path, size, shards=2), False


def _busy_seconds() -> float | None:
    """CPU-seconds all processes have been busy since boot (/proc/stat), or None off Linux."""
    try:
        with open("/proc/stat") as f:
            vals = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = vals[3] + (vals[4] if len(vals) > 4 else 0)          # idle + iowait
    return (sum(vals[:8]) - idle) / os.sysconf("SC_CLK_TCK")     # user..steal; guest is inside user


def _children_cpu() -> float:
    import resource
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def run_row(row, base_cfg, paths, cold, repeat, timeout) -> dict:
    name, io = row
    out = {"strategy": name, "io": io, "label": label(row)}
    cfg = {**base_cfg, "strategy": name, "io": io or "mmap"}
    runs = []
    for _ in range(repeat):
        cached = prepare(paths, cold)
        busy0, mine0, t0 = _busy_seconds(), _children_cpu(), time.perf_counter()
        try:
            res = run_in_fresh_process(cfg, timeout=timeout)
        except StrategyUnavailable as e:
            return {**out, "status": "skipped", "reason": e.reason}
        except StrategyError as e:
            if name in STRATEGIES:      # ours and safetensors': a failure is a failure
                return {**out, "status": "failed", "reason": e.reason}
            return {**out, "status": "skipped", "reason": f"failed: {e.reason}"}
        wall, busy1, mine = time.perf_counter() - t0, _busy_seconds(), _children_cpu() - mine0
        res.pop("samples", None)
        res["cached_before"] = cached
        # CPU time other processes took while this one ran (whole process lifetime, start-up
        # included), as a share of the machine: the noise a timing carries on a shared box
        res["others_cpu"] = (None if busy0 is None or busy1 is None else
                             max(0.0, (busy1 - busy0 - mine) / (wall * (os.cpu_count() or 1))))
        runs.append(res)
    peak = lambda key: max((r[key] for r in runs if r.get(key) is not None), default=None)  # noqa: E731
    above = lambda key: (None if any(r[f"peak_{key}"] is None or r[f"baseline_{key}"] is None for r in runs)  # noqa: E731
                         else max(r[f"peak_{key}"] - r[f"baseline_{key}"] for r in runs))
    secs = [r["seconds"] for r in runs]
    return {**out, "status": "ok", "reason": "", "seconds": statistics.median(secs), "seconds_all": secs,
            "peak_rss_above": above("rss"), "peak_anon_above": above("anon"), "peak_file_above": above("file"),
            "peak_dev_alloc": peak("peak_dev_alloc"), "peak_dev_reserved": peak("peak_dev_reserved"),
            "baseline_rss": min(r["baseline_rss"] for r in runs), "retained_bytes": runs[0]["retained_bytes"],
            "retained_all": [r["retained_bytes"] for r in runs], "threads": runs[0]["threads"],
            "note": runs[0]["note"], "cached_before": [r["cached_before"] for r in runs],
            "transient_above": max(r["peak_rss"] - r["baseline_rss"] - r["retained_bytes"] for r in runs),
            "others_cpu": max((r["others_cpu"] for r in runs if r["others_cpu"] is not None), default=None)}


def add_ratios(rows: list[dict], ceil: dict, total: int) -> None:
    ref = next((r for r in rows if (r["strategy"], r["io"]) == REFERENCE and r["status"] == "ok"), None)
    naive = best_naive(rows)
    for r in rows:
        if r["status"] != "ok":
            continue
        r["gbps"] = total / r["seconds"] / 1e9
        r["x_ceiling"] = r["seconds"] / ceil["seconds"]
        r["x_mmapload"] = r["seconds"] / ref["seconds"] if ref else None
        r["x_naive"] = r["seconds"] / naive["seconds"] if naive else None
        r["rss_x_mmapload"] = (r["peak_rss_above"] / ref["peak_rss_above"]
                               if ref and ref["peak_rss_above"] and r["peak_rss_above"] is not None else None)


def bench_size(size: int, root: Path, args, rows_wanted, device, opts, cold) -> dict:
    t0 = time.perf_counter()
    path, reused = checkpoint_for(size, root)
    gen_s = time.perf_counter() - t0
    ckpt = open_checkpoint(path)
    paths = [str(s.path) for s in ckpt.shards]
    print(f"# {size_name(size)}: {'reused' if reused else f'generated in {gen_s:.0f} s'} {path} "
          f"({ckpt.total_bytes:,} bytes, {len(paths)} shards, largest tensor "
          f"{max(t.nbytes for t in ckpt.tensors) / MiB:.0f} MiB)", file=sys.stderr, flush=True)
    ceil = ceiling(ckpt, paths, device, opts, cold)
    base_cfg = dict(checkpoint=str(ckpt.root), device=str(device), ring_bytes=args.ring_bytes, fp8=args.fp8,
                    granularity=args.granularity, skip=[], interval=args.interval, progress=False,
                    threads=args.threads, read_threads=args.read_threads, policy=args.policy)
    rows = []
    for row in rows_wanted:
        print(f"#   {label(row)} ...", file=sys.stderr, flush=True)
        r = run_row(row, base_cfg, paths, cold, args.repeat, args.timeout)
        print(f"#   {label(row)}: " + (f"{r['seconds']:.2f} s, peak RSS +{r['peak_rss_above'] / MiB:.0f} MiB"
                                        if r["status"] == "ok" else f"{r['status']}: {r['reason']}"),
              file=sys.stderr, flush=True)
        rows.append(r)
    add_ratios(rows, ceil, ckpt.total_bytes)
    return {"size": size, "size_name": size_name(size), "checkpoint": str(ckpt.root),
            "checkpoint_bytes": ckpt.total_bytes, "shards": len(paths), "reused": reused,
            "largest_tensor_bytes": max(t.nbytes for t in ckpt.tensors), "ceiling": ceil, "rows": rows}


def best_naive(rows: list[dict]) -> dict | None:
    """The baseline to beat: the faster of the plain safetensors loaders (load_file, safe_open) in this run."""
    plain = [r for r in rows if r["strategy"] in ("naive", "safe_open") and r["status"] == "ok"]
    return min(plain, key=lambda r: r["seconds"]) if plain else None


# -- output ------------------------------------------------------------------------------------
COLUMNS = ["strategy", "io", "seconds", "GB/s", "x ceiling", "x naive best", "x mmapload (mmap)",
           "peak RSS above base (MiB)",
           "RSS x mmapload (mmap)", "peak anon above base (MiB)", "peak file above base (MiB)",
           "transient: RSS above base - retained (MiB)", "peak device (MiB)", "others' CPU"]


def _mib(v) -> str:
    return "-" if v is None else f"{v / MiB:.0f}"


def _x(v, digits=2) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def table(result: dict) -> str:
    ceil, total = result["ceiling"], result["checkpoint_bytes"]
    ref = next((r for r in result["rows"] if (r["strategy"], r["io"]) == REFERENCE and r["status"] == "ok"), None)
    naive = best_naive(result["rows"])
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * (len(COLUMNS) - 2)) + "|"]
    for r in result["rows"]:
        if r["status"] != "ok":
            reason = r["reason"].replace("|", "/").replace("\n", " ")
            reason = reason if len(reason) <= 140 else reason[:137] + "..."
            cells = [r["strategy"], r["io"] or "-", f"{r['status']}: {reason}"] + ["-"] * (len(COLUMNS) - 3)
        else:
            cells = [r["strategy"], r["io"] or "-", f"{r['seconds']:.2f}", f"{r['gbps']:.2f}", _x(r["x_ceiling"]),
                     _x(r["x_naive"]), _x(r["x_mmapload"]), _mib(r["peak_rss_above"]), _x(r["rss_x_mmapload"], 1),
                     _mib(r["peak_anon_above"]), _mib(r["peak_file_above"]), _mib(r["transient_above"]),
                     _mib(r["peak_dev_alloc"]), "-" if r["others_cpu"] is None else f"{r['others_cpu']:.0%}"]
        lines.append("| " + " | ".join(cells) + " |")
    stage_rows = [("ceiling", f"max: {ceil['slowest']}", ceil["seconds"])] + \
        [(f"ceiling: {k}", {"quantize": "in memory", "cpu": f"shared {v.get('cores')} cores"}.get(
            k, v["how"].split(" (")[0]), v["seconds"])
         for k, v in ceil["stages"].items()]
    for name, how, secs in stage_rows:
        cells = [name, how, f"{secs:.2f}", f"{total / secs / 1e9:.2f}", _x(secs / ceil["seconds"]),
                 _x(secs / naive["seconds"] if naive else None),
                 _x(secs / ref["seconds"] if ref else None)] + ["-"] * (len(COLUMNS) - 7)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def header(result: dict, meta: dict) -> str:
    c = result["ceiling"]
    notes = [f"- {r['label']}: {r['note']}" for r in result["rows"] if r.get("note")]
    return "\n".join([
        f"### {result['size_name']} llama-shaped bf16 checkpoint ({result['checkpoint_bytes'] / 1e9:.2f} GB, "
        f"{result['shards']} shards, largest tensor {result['largest_tensor_bytes'] / MiB:.0f} MiB), "
        f"device {meta['device']}, {meta['cache']} page cache"
        + (f" ({meta['cold_method']})" if meta["cold_method"] else " (shards read once before each run)")
        + f", ring {meta['ring_bytes'] / MiB:.0f} MiB, torch threads {meta['threads_label']}",
        "",
        f"seconds: the load + quantize alone, median of {meta['repeat']}; GB/s of checkpoint bytes; peaks are "
        "above each process's baseline (max over repeats); x = time / the row's time (lower is faster); "
        "transient = peak RSS above base minus the bytes the loaded model keeps (FP8 weights + scales + "
        "the unquantized tensors, the same for every loader); others' CPU = CPU time of other processes "
        "during the run, as a share of all cores (noise).",
        f"ceiling = max(read {c['stages']['read']['seconds']:.2f} s [{c['stages']['read']['how']}], quantize "
        f"{c['stages']['quantize']['seconds']:.2f} s [{c['stages']['quantize']['how']}]"
        + (f", h2d {c['stages']['h2d']['seconds']:.2f} s [{c['stages']['h2d']['how']}]" if "h2d" in c["stages"] else "")
        + (f", cpu {c['stages']['cpu']['seconds']:.2f} s [{c['stages']['cpu']['how']}]" if "cpu" in c["stages"] else "")
        + "); x naive best = time / the faster of naive (load_file) and safe_open in this run (the baseline to beat)",
        *(["", "notes:", *notes] if notes else []),
        "",
    ])


def growth(results: list[dict]) -> str:
    sizes = [r["size_name"] for r in results]
    cols = ["strategy", "io"] + [f"s @{s}" for s in sizes] + [f"RSS MiB @{s}" for s in sizes] + \
        [f"time x ({sizes[-1]}/{sizes[0]})", f"RSS x ({sizes[-1]}/{sizes[0]})"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * (len(cols) - 2)) + "|"]
    for i, row in enumerate(results[0]["rows"]):
        per = [res["rows"][i] for res in results]
        ok = [p["status"] == "ok" for p in per]
        secs = [f"{p['seconds']:.2f}" if o else p["status"] for p, o in zip(per, ok)]
        rss = [_mib(p["peak_rss_above"]) if o else "-" for p, o in zip(per, ok)]
        both = ok[0] and ok[-1]
        gt = _x(per[-1]["seconds"] / per[0]["seconds"]) if both else "-"
        gr = _x(per[-1]["peak_rss_above"] / per[0]["peak_rss_above"]) if both and per[0]["peak_rss_above"] else "-"
        lines.append("| " + " | ".join([row["strategy"], row["io"] or "-", *secs, *rss, gt, gr]) + " |")
    return "\n".join(lines)


# -- main --------------------------------------------------------------------------------------
def bench_root(args) -> tuple[Path, str | None]:
    """(folder the checkpoints go to, the temporary folder to delete at the end or None)."""
    if args.keep:
        root = Path(args.keep)
        root.mkdir(parents=True, exist_ok=True)
        return root, None
    tmp = tempfile.mkdtemp(prefix="mmapload-bench-", dir=args.tmp)
    return Path(tmp), tmp


def cleanup(tmp: str | None) -> None:
    if tmp:
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--sizes", type=parse_sizes, help="comma-separated checkpoint sizes (default 4GiB, 8GiB "
                    "with --device cuda; --quick 64MiB)")
    ap.add_argument("--strategies", type=parse_strategies,
                    help=f"comma-separated from {', '.join(ALL_STRATEGIES)}; mmapload:IO for one io mode "
                         "(default: all; --quick: naive,safe_open,runai_capped,mmapload:mmap,mmapload:direct)")
    ap.add_argument("--cold", action="store_true", help="drop the page cache before each run (default: warm)")
    ap.add_argument("--cold-method", choices=["auto", "drop_caches", "fadvise"], default="auto",
                    help="auto: drop_caches where writable, else posix_fadvise DONTNEED on the shards")
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default cpu)")
    ap.add_argument("--threads", type=int, help="torch.set_num_threads in every process (default: torch's own)")
    ap.add_argument("--read-threads", type=int, help="mmapload's threads copying into the ring "
                    "(default: automatic, 2 on cpu, up to 4 with cuda)")
    ap.add_argument("--ring-bytes", type=parse_size, help="mmapload ring, and the capped peers' limit (256MiB)")
    ap.add_argument("--granularity", choices=["tensor", "channel", "block"], default="tensor")
    ap.add_argument("--fp8", choices=sorted(FP8_BY_NAME), default="e4m3")
    ap.add_argument("--policy", choices=["auto", "model", "names"], default="auto",
                    help="which tensors are quantized (auto; names skips building the model of config.json)")
    ap.add_argument("--repeat", type=int, default=1, help="runs per strategy; seconds are the median (1)")
    ap.add_argument("--interval", type=float, default=0.01, help="memory sampling interval in seconds (0.01)")
    ap.add_argument("--timeout", type=float, default=900, help="seconds before a run counts as failed (900)")
    ap.add_argument("--quick", action="store_true", help="a ~64 MiB checkpoint and a few strategies (tests)")
    ap.add_argument("--keep", metavar="DIR", help="generate checkpoints into DIR and keep them (reused "
                    "when there); default: a temporary folder, deleted at the end")
    ap.add_argument("--tmp", metavar="DIR", help="where the temporary folder goes (default: the system's)")
    ap.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    ap.add_argument("--tp", metavar="N[,N]", help="tensor parallel: world sizes, each a gloo world of N fresh "
                    "ranks on this machine; strategies safe_open (+ narrow, the baseline) and mmapload[:io] "
                    "(tools/bench_tp.py); default size 1GiB (--quick 64MiB), threads cores // N per rank")
    ap.add_argument("--row-weight", metavar="RxC", help="with --tp: a checkpoint of one row-parallel bf16 "
                    "weight [R, C] instead of the llama one (e.g. 16384x8192: 2 KiB of each row per rank at TP=8)")
    ap.add_argument("--convert", action="store_true", help="mmapload.convert against llm-compressor's "
                    "model_free_ptq (tools/bench_convert.py); --granularity channel or block")
    ap.add_argument("--scale-dtype", default="float32", choices=["float32", "weight"], help="with --convert: "
                    "mmapload's scale_dtype (weight: compressed-tensors' numerics, byte-equal output)")
    ap.add_argument("--llmc-python", metavar="PATH", help="with --convert: the python of a venv with "
                    "llmcompressor 0.14 (default: this one)")
    args = ap.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else list(argv)
    if args.threads is not None and args.threads < 1:
        ap.error("--threads must be >= 1")
    if args.repeat < 1:
        ap.error("--repeat must be >= 1")
    if args.tp or args.row_weight:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import bench_tp
        try:
            args.tp = bench_tp.parse_tp(args.tp or "")
            args.row_weight = args.row_weight and bench_tp.parse_shape(args.row_weight)
        except ValueError as e:
            ap.error(f"{e} (--row-weight needs --tp)")
        if args.device != "cpu":
            ap.error("--tp runs on the CPU (gloo)")
        args.sizes = args.sizes or [QUICK_SIZE if args.quick else GiB]
        args.ring_bytes = args.ring_bytes or (QUICK_RING if args.quick else 256 * MiB)
        return bench_tp.run_tp(args, SimpleNamespace(**globals()))   # this file's helpers
    if args.convert:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import bench_convert
        if args.device != "cpu":
            ap.error("--convert runs on the CPU")
        args.sizes = args.sizes or [QUICK_SIZE if args.quick else 4 * GiB]
        return bench_convert.run_convert(args, SimpleNamespace(**globals()))
    args.sizes = args.sizes or [QUICK_SIZE if args.quick else 8 * GiB if args.device.startswith("cuda") else 4 * GiB]
    rows_wanted = args.strategies or (QUICK_ROWS if args.quick else ALL_ROWS)
    if args.ring_bytes is None:
        args.ring_bytes = QUICK_RING if args.quick else 256 * MiB
    try:
        device = torch.device(args.device)
    except RuntimeError as e:
        ap.error(str(e))
    if device.type == "cuda":
        if not torch.cuda.is_available():
            ap.error("--device cuda: no CUDA device here")
        device = torch.device("cuda", device.index if device.index is not None else torch.cuda.current_device())
    elif device.type != "cpu":
        ap.error("--device must be cpu or cuda[:N]")
    opts = LoadOptions(ring_bytes=args.ring_bytes, granularity=args.granularity,
                       fp8_dtype=FP8_BY_NAME[args.fp8], policy=args.policy)

    cold = probe_cold_method(args.cold_method) if args.cold else None
    meta = machine(device, "cold" if cold else "warm", {"drop_caches": "echo 3 > /proc/sys/vm/drop_caches",
                                                         "fadvise": "posix_fadvise DONTNEED"}.get(cold))
    if args.threads:
        torch.set_num_threads(args.threads)       # the quantize ceiling, like every child
    meta.update(threads=args.threads, threads_label=str(args.threads or f"default ({meta['torch_default_threads']})"),
                ring_bytes=args.ring_bytes, granularity=args.granularity, fp8=args.fp8, repeat=args.repeat,
                policy=args.policy,
                strategies=[label(r) for r in rows_wanted], interval=args.interval,
                command=" ".join(["python", "tools/bench.py", *(sys.argv[1:] if argv is None else argv)]))

    root, tmp = bench_root(args)
    meta["filesystem"] = fstype(root)
    results = []
    try:
        for size in args.sizes:
            results.append(bench_size(size, root, args, rows_wanted, device, opts, cold))
    finally:
        cleanup(tmp)
    meta["loadavg_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None

    m = meta
    print(f"machine: {m['cpu']}, {m['cores']} cores ({m['cores_usable']} usable), {m['ram_bytes'] / GiB:.1f} GiB RAM, "
          f"kernel {m['kernel']}, python {m['python']}, torch {m['versions']['torch']}, device {m['device']} "
          f"({m['device_name']}), {m['cache']} page cache, checkpoint on {m['filesystem']}; load average "
          f"{' '.join(f'{x:.2f}' for x in m['loadavg_start'] or [])} at start, "
          f"{' '.join(f'{x:.2f}' for x in m['loadavg_end'] or [])} at end")
    print("peers: " + ", ".join(f"{d} {v or 'not installed'}" for d, v in m["versions"].items()
                                if d not in ("torch", "numpy")))
    print(f"command: {m['command']}\n")
    for res in results:
        print(header(res, meta))
        print(table(res) + "\n")
    if len(results) > 1:
        print(f"### growth with size ({', '.join(r['size_name'] for r in results)}): seconds and peak RSS above base\n")
        print(growth(results) + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": meta, "results": results}, indent=2) + "\n")
    failed = [r["label"] for res in results for r in res["rows"] if r["status"] == "failed"]
    if failed:
        print(f"bench: mmapload's own strategies failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
