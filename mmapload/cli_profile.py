"""``mmapload profile``: each loader in a fresh process, sampled by ``mmapload.bench.sampler``;
the memory timelines side by side (timeline.csv, summary.json, memory.png). Its options are
the ones the harness (``mmapload.bench.loaders``) applies to every loader, and no others."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .config import IO_MODES, RING_BYTES
from .bench import ALL_STRATEGIES, STRATEGIES   # names only; the harness loads lazily
from .fp8 import Granularity

__all__ = ["add_profile", "run_profile"]


def _strategies(text: str) -> list[str]:
    names = [s.strip() for s in text.split(",") if s.strip()]
    bad = [s for s in names if s not in ALL_STRATEGIES]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"unknown strategy {bad or text!r}; "
                                         f"choose from {','.join(ALL_STRATEGIES)}")
    return names


def _seconds(text: str) -> float:
    v = float(text)
    if not 1e-4 <= v <= 60:
        raise argparse.ArgumentTypeError(f"{text} is not an interval in seconds (1e-4 to 60)")
    return v


def run_profile(a: argparse.Namespace) -> int:
    from .checkpoint import open_checkpoint
    from .bench.loaders import drop_cache, run_in_fresh_process
    from .bench.sampler import Sample
    from .bench.timeline import plot, write_csv
    if a.cold and not hasattr(os, "posix_fadvise"):
        print("mmapload: error: --cold needs posix_fadvise (Linux)", file=sys.stderr)
        return 2
    ckpt = open_checkpoint(a.checkpoint)   # validate before spawning anything
    shards = [str(s.path) for s in ckpt.shards]
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = dict(checkpoint=str(ckpt.root), device=a.device, ring_bytes=a.ring_bytes, fp8=a.fp8,
               granularity=a.granularity, skip=a.skip, io=a.io, interval=a.interval, progress=a.progress,
               threads=a.threads, read_threads=a.read_threads)
    runs, results = {}, {}
    for name in a.strategies:
        if a.cold:
            drop_cache(shards)
        print(f"profiling {name} in a fresh process ...", flush=True)
        try:
            res = run_in_fresh_process({**cfg, "strategy": name})
        except RuntimeError as e:
            print(f"mmapload: error: {e}", file=sys.stderr)
            return 2
        runs[name] = [Sample(*row) for row in res.pop("samples")]
        results[name] = {**res, "samples": len(runs[name])}
    summary = {"checkpoint": str(ckpt.root), "checkpoint_bytes": ckpt.total_bytes, "device": a.device,
               "ring_bytes": a.ring_bytes, "granularity": a.granularity, "fp8": a.fp8, "io": a.io,
               "cache": "cold" if a.cold else "warm", "interval": a.interval, "threads": a.threads,
               "strategies": results}
    write_csv(out / "timeline.csv", runs)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print("\n" + _table(results))
    wrote = ["timeline.csv", "summary.json"]
    try:
        plot(out / "memory.png", runs, dpi=a.dpi, title=(
            f"{Path(ckpt.root).name}: {ckpt.total_bytes / 2**30:.2f} GiB, device {a.device}, ring "
            f"{a.ring_bytes / 2**20:.0f} MiB, {'cold' if a.cold else 'warm'} page cache"
            + (f", {a.threads} torch thread{'s' * (a.threads > 1)}" if a.threads else "")))
        wrote.append("memory.png")
    except ImportError:
        print("memory.png not drawn: matplotlib is missing (pip install mmapload[plot])")
    print(f"wrote {', '.join(wrote)} to {out}")
    return 0


def _table(results: dict) -> str:
    mib = lambda b: "-" if b is None else f"{b / 2**20:,.0f}"  # noqa: E731
    cols = ["strategy", "seconds", "base RSS", "peak RSS", "peak-base", "peak anon", "peak file",
            "page cache", "dev alloc", "dev reserved", "retained"]
    rows = [[n, f"{r['seconds']:.2f}", mib(r["baseline_rss"]), mib(r["peak_rss"]),
             mib(r["peak_rss"] - r["baseline_rss"]), mib(r["peak_anon"]), mib(r["peak_file"]),
             mib(r["peak_page_cache"]), mib(r["peak_dev_alloc"]), mib(r["peak_dev_reserved"]),
             mib(r["retained_bytes"])] for n, r in results.items()]
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(cols)]
    line = lambda r: "  ".join(v.ljust(w) if i == 0 else v.rjust(w)  # noqa: E731
                                for i, (v, w) in enumerate(zip(r, widths)))
    return "\n".join([line(cols), *(line(r) for r in rows), "(MiB; seconds of the load alone)"])


def add_profile(sub, parse_size) -> None:
    """The ``profile`` subcommand on ``sub`` (argparse subparsers); ``parse_size``: the CLI's."""
    p = sub.add_parser("profile", help="host RSS, page cache and device memory of each loader over "
                       "a load, side by side (fresh process per loader)")
    p.add_argument("checkpoint")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N (default cpu)")
    p.add_argument("--ring-bytes", type=parse_size, default=RING_BYTES,
                   help=f"mmapload's ring buffer size ({RING_BYTES >> 20}MiB)")
    p.add_argument("--granularity", default="tensor", choices=[g.value for g in Granularity],
                   help="FP8 scales of every loader's quantizer: per tensor (default), channel or block")
    p.add_argument("--fp8", default="e4m3", choices=["e4m3", "e5m2"], help="FP8 format (e4m3)")
    p.add_argument("--skip", action="append", default=[], help="tensor name pattern kept unquantized "
                   "(glob, or a substring; repeatable)")
    p.add_argument("--io", default="mmap", choices=IO_MODES, help="how mmapload reads shards (mmap)")
    p.add_argument("--read-threads", type=int, default=None, help="mmapload's threads copying into the ring "
                   "(default: automatic)")
    p.add_argument("--progress", action="store_true", help="show a progress line on stderr")
    p.add_argument("--strategies", type=_strategies, default=list(STRATEGIES),
                   help=f"comma-separated, from {','.join(ALL_STRATEGIES)} (default "
                        f"{','.join(STRATEGIES)}; the peers need pip install mmapload[bench])")
    p.add_argument("--out", metavar="DIR", default="mmapload-profile",
                   help="where timeline.csv, summary.json and memory.png go (./mmapload-profile)")
    p.add_argument("--cold", action="store_true", help="drop the checkpoint from the page cache "
                   "before each loader (default: warm, the cache as the previous loader left it)")
    p.add_argument("--interval", type=_seconds, default=0.01, help="seconds between samples (0.01)")
    p.add_argument("--threads", type=int, help="torch.set_num_threads in every loader's process "
                   "(default: torch's own choice)")
    p.add_argument("--dpi", type=int, default=100, help="resolution of memory.png (100)")
