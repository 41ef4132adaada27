"""tools/bench.py --tp N: tensor-parallel loads, rank by rank (CPU, gloo on 127.0.0.1).

For each strategy a world of N fresh ranks loads the checkpoint (mmapload.bench.tp.run_world):
    safe_open          what engines do: every rank safe_opens every shard, get_tensor each
                       tensor, narrows it to its slice (the same slices mmapload plans), copies
                       and quantizes it (the same FP8 quantizer); the baseline of the ratios
    mmapload:IO        stream_quantize(tp_size=N, io=IO): each rank reads only its slice

    python tools/bench.py --tp 2 --sizes 1GiB --repeat 3            # warm
    python tools/bench.py --tp 2,4 --sizes 1GiB --cold --repeat 3
    python tools/bench.py --tp 1,8 --row-weight 16384x8192 --cold   # one row-parallel weight
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from mmapload.bench.loaders import StrategyError
from mmapload.bench.sampler import page_cache_bytes
from mmapload.bench.tp import run_world
from mmapload.checkpoint import open_checkpoint
from mmapload.config import IO_MODES

MiB = 1 << 20
TP_ROWS = [("safe_open", None), *(("mmapload", io) for io in IO_MODES)]
BASELINE = ("safe_open", None)
ROW_NAME = "model.layers.0.mlp.down_proj.weight"    # row-parallel by tp.py's default rule
PER_RANK = ["seconds", "cpu_seconds", "storage_read", "rchar", "major_faults"]      # median over repeats
PEAKS = ["peak_rss_above", "peak_anon_above", "peak_file_above"]                     # max over repeats
ONCE = ["bytes_read", "retained_bytes", "signature", "tensors", "collectives", "threads", "vmhwm"]


def parse_tp(text: str) -> list[int]:
    sizes = sorted({int(s) for s in text.split(",") if s.strip()})
    if not sizes or sizes[0] < 1:
        raise ValueError(f"--tp wants world sizes >= 1, got {text!r}")
    return sizes


def parse_shape(text: str) -> tuple[int, int]:
    r, _, c = text.lower().partition("x")
    try:
        shape = (int(r), int(c))
    except ValueError:
        shape = (0, 0)
    if min(shape) < 1:
        raise ValueError(f"--row-weight wants ROWSxCOLS (positive ints), got {text!r}")
    return shape


def row_checkpoint(root: Path, shape: tuple[int, int]) -> tuple[Path, bool]:
    """A checkpoint of one bf16 row-parallel weight ``[rows, cols]`` (reused when there)."""
    from safetensors.torch import save_file
    path = root / f"row-{shape[0]}x{shape[1]}"
    try:
        ckpt = open_checkpoint(path)
        if [(t.name, tuple(t.shape)) for t in ckpt.tensors] == [(ROW_NAME, shape)]:
            return path, True
    except (OSError, ValueError):
        pass
    path.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    save_file({ROW_NAME: torch.randn(shape, generator=g).mul_(0.02).to(torch.bfloat16)},
              str(path / "model.safetensors"), metadata={"format": "pt"})
    return path, False


def run_strategy(row, cfg, world, paths, cold, b, args) -> dict:
    """One strategy at world size ``world``, ``args.repeat`` times: per rank medians / peaks."""
    out = {"strategy": row[0], "io": row[1], "label": b.label(row), "world": world}
    runs, walls, cached, others = [], [], [], []
    for _ in range(args.repeat):
        b.prepare(paths, cold)
        busy0, mine0, t0 = b._busy_seconds(), b._children_cpu(), time.perf_counter()
        try:
            runs.append(run_world({**cfg, "strategy": row[0], "io": row[1] or "mmap"}, world, args.timeout))
        except StrategyError as e:
            return {**out, "status": "failed", "reason": e.reason}
        walls.append(time.perf_counter() - t0)
        busy1, mine = b._busy_seconds(), b._children_cpu() - mine0
        if busy0 is not None and busy1 is not None:   # other processes' CPU over the world's life
            others.append(max(0.0, (busy1 - busy0 - mine) / (walls[-1] * (os.cpu_count() or 1))))
        cached.append(page_cache_bytes(paths))
    ranks = []
    for r in range(world):
        per = [run[r] for run in runs]
        agg = {k: per[0][k] for k in ONCE} | {f"{k}_all": [p[k] for p in per] for k in ("seconds", "storage_read")}
        agg |= {k: statistics.median(p[k] for p in per) for k in PER_RANK}
        agg |= {k: max((p[k] for p in per if p[k] is not None), default=None) for k in PEAKS}
        ranks.append({"rank": r, **agg})
    top = {k: max(x[k] for x in ranks) for k in PER_RANK + ["bytes_read", "retained_bytes"]}
    top |= {k: max((x[k] for x in ranks if x[k] is not None), default=None) for k in PEAKS}
    return {**out, "status": "ok", "reason": "", "ranks": ranks, "max": top,
            "sum": {k: sum(x[k] for x in ranks) for k in ("bytes_read", "storage_read", "cpu_seconds")},
            "wall_seconds": statistics.median(walls), "cached_after": max(cached),
            "others_cpu": max(others, default=None)}


def add_ratios(rows: list[dict]) -> None:
    """x safe_open: each rank against the same rank of the baseline, max against max."""
    base = next((r for r in rows if (r["strategy"], r["io"]) == BASELINE and r["status"] == "ok"), None)
    for r in rows:
        if r["status"] != "ok" or base is None:
            continue
        pairs = [(x, y) for x, y in zip(r["ranks"], base["ranks"])] + [(r["max"], base["max"])]
        for mine, theirs in pairs:
            mine["x_base"] = {k: (mine[k] / theirs[k] if mine[k] is not None and theirs[k] else None)
                              for k in ("seconds", "bytes_read", "peak_rss_above")}
        r["same_slices"] = all(x["signature"] == y["signature"] for x, y in zip(r["ranks"], base["ranks"]))


COLUMNS = ["strategy", "io", "rank", "seconds", "x safe_open", "CPU s", "bytes read (MiB)", "x safe_open",
           "storage reads (MiB)", "major faults", "peak RSS above base (MiB)", "x safe_open",
           "peak anon above base (MiB)", "peak file above base (MiB)", "kept (MiB)", "collectives"]
NODE = ["strategy", "io", "ranks", "threads/rank", "max seconds", "bytes read, all ranks (MiB)",
        "storage reads, all ranks (MiB)", "storage / checkpoint", "CPU s, all ranks",
        "checkpoint in page cache after (MiB)", "world wall s (start-up incl.)", "others' CPU"]


def _m(v) -> str:
    return "-" if v is None else f"{v / MiB:.1f}" if v < 100 * MiB else f"{v / MiB:.0f}"


def _x(v) -> str:
    return "-" if v is None else f"{v:.2f}"


def _line(cells) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def rank_table(rows: list[dict]) -> str:
    lines = [_line(COLUMNS), "|" + "|".join(["---"] * 3 + ["---:"] * (len(COLUMNS) - 3)) + "|"]
    for r in rows:
        if r["status"] != "ok":
            lines.append(_line([r["strategy"], r["io"] or "-", "-", f"{r['status']}: {r['reason'][:200]}"]
                               + ["-"] * (len(COLUMNS) - 4)))
            continue
        for x in r["ranks"] + [dict(r["max"], rank="**max**")]:
            xb = x.get("x_base", {})
            coll = "-" if "collectives" not in x else str(x["collectives"])
            lines.append(_line([r["strategy"], r["io"] or "-", x["rank"], f"{x['seconds']:.2f}",
                                _x(xb.get("seconds")), f"{x['cpu_seconds']:.2f}", _m(x["bytes_read"]),
                                _x(xb.get("bytes_read")), _m(x["storage_read"]), f"{x['major_faults']:.0f}",
                                _m(x["peak_rss_above"]), _x(xb.get("peak_rss_above")), _m(x["peak_anon_above"]),
                                _m(x["peak_file_above"]), _m(x["retained_bytes"]), coll]))
    return "\n".join(lines)


def node_table(results: list[dict], total: int) -> str:
    lines = [_line(NODE), "|" + "|".join(["---"] * 2 + ["---:"] * (len(NODE) - 2)) + "|"]
    for res in results:
        for r in res["rows"]:
            if r["status"] != "ok":
                continue
            lines.append(_line([r["strategy"], r["io"] or "-", r["world"], r["ranks"][0]["threads"],
                                f"{r['max']['seconds']:.2f}", _m(r["sum"]["bytes_read"]), _m(r["sum"]["storage_read"]),
                                _x(r["sum"]["storage_read"] / total), f"{r['sum']['cpu_seconds']:.2f}",
                                _m(r["cached_after"]), f"{r['wall_seconds']:.1f}",
                                "-" if r["others_cpu"] is None else f"{r['others_cpu']:.0%}"]))
    return "\n".join(lines)


def header(res: dict, meta: dict) -> str:
    notes = [f"- {r['label']}: the ranks' tensors differ in names or shapes from safe_open's" for r in res["rows"]
             if r.get("same_slices") is False]
    cores = meta["cores_usable"]
    return "\n".join([
        f"### TP={res['world']} ({res['world']} ranks, gloo on 127.0.0.1, {res['threads']} torch thread(s) per rank, "
        f"{cores} cores{': oversubscribed' if res['world'] * res['threads'] > cores else ''}), {res['what']}, "
        f"{meta['cache']} page cache" + (f" ({meta['cold_method']})" if meta["cold_method"] else "")
        + f", ring {meta['ring_bytes'] / MiB:.0f} MiB per rank", "",
        f"seconds / CPU s / storage reads: median of {meta['repeat']} per rank; peaks: max over repeats, above "
        "the rank's post-import baseline (VmHWM after clear_refs; anon / file sampled); **max** = max over "
        "ranks; x safe_open = this / the safe_open baseline's (same rank, same run; < 1 is better). bytes read: "
        "mmapload's report.bytes_read; safe_open's = every byte get_tensor handed over (it maps lazily: only the "
        "pages the narrow touches, plus read-ahead, come from storage). storage reads = /proc/self/io "
        "read_bytes (the ranks share one page cache: a page counts once, for the rank that faulted it first; "
        "~0 when warm). safe_open's per-tensor (and row-parallel per-channel) scales are computed on each "
        "rank's slice, so they change with TP (as vLLM's online FP8); mmapload MAX-reduces amaxes over the "
        "ranks (TP=1 scales, sliced).", *(["", *notes] if notes else []), ""])


def run_tp(args, b) -> int:
    """tools/bench.py's --tp mode; ``b`` is tools/bench.py (its page-cache and checkpoint helpers)."""
    rows_wanted = args.strategies or TP_ROWS
    bad = [b.label(r) for r in rows_wanted if r[0] not in ("safe_open", "mmapload")]
    if bad:
        raise SystemExit(f"bench: --tp measures safe_open (+ narrow) and mmapload[:io] only, not {', '.join(bad)}")
    cold = b.probe_cold_method(args.cold_method) if args.cold else None
    meta = b.machine(torch.device("cpu"), "cold" if cold else "warm", {
        "drop_caches": "echo 3 > /proc/sys/vm/drop_caches", "fadvise": "posix_fadvise DONTNEED"}.get(cold))
    meta.update(ring_bytes=args.ring_bytes, granularity=args.granularity, fp8=args.fp8, repeat=args.repeat,
                policy=args.policy, tp=args.tp, row_weight=args.row_weight, strategies=[b.label(r) for r in rows_wanted],
                command=" ".join(["python", "tools/bench.py", *args.argv]))
    root, tmp = b.bench_root(args)
    meta["filesystem"] = b.fstype(root)
    results = []
    try:
        if args.row_weight:
            path, reused = row_checkpoint(root, args.row_weight)
            what = f"one row-parallel bf16 weight {list(args.row_weight)} ({args.row_weight[1] * 2} B rows)"
        else:
            path, reused = b.checkpoint_for(args.sizes[0], root)
            what = f"{b.size_name(args.sizes[0])} llama-shaped bf16 checkpoint"
        ckpt = open_checkpoint(path)
        paths = [str(s.path) for s in ckpt.shards]
        what += f" ({ckpt.total_bytes / 1e9:.3f} GB, {len(paths)} shard{'s' * (len(paths) > 1)})"
        print(f"# {what}: {'reused' if reused else 'generated'} {path}", file=sys.stderr, flush=True)
        for world in args.tp:
            threads = args.threads or max(1, meta["cores_usable"] // world)
            cfg = dict(checkpoint=str(path), ring_bytes=args.ring_bytes, fp8=args.fp8, granularity=args.granularity,
                       policy=args.policy, read_threads=args.read_threads, threads=threads, interval=args.interval,
                       tp_timeout=min(args.timeout, 300.0))
            rows = []
            for row in rows_wanted:
                print(f"#   TP={world} {b.label(row)} ...", file=sys.stderr, flush=True)
                rows.append(run_strategy(row, cfg, world, paths, cold, b, args))
                r = rows[-1]
                print(f"#   TP={world} {b.label(row)}: " + (f"max {r['max']['seconds']:.2f} s" if r["status"] == "ok"
                                                          else f"{r['status']}: {r['reason']}"), file=sys.stderr, flush=True)
            add_ratios(rows)
            results.append({"world": world, "threads": threads, "what": what, "checkpoint": str(path),
                            "checkpoint_bytes": ckpt.total_bytes, "rows": rows})
    finally:
        b.cleanup(tmp)
    meta["loadavg_end"] = list(os.getloadavg())
    print(f"machine: {meta['cpu']}, {meta['cores']} cores ({meta['cores_usable']} usable), "
          f"{meta['ram_bytes'] / 2**30:.1f} GiB RAM, kernel {meta['kernel']}, torch {meta['versions']['torch']}, "
          f"safetensors {meta['versions']['safetensors']}, {meta['cache']} page cache, checkpoint on "
          f"{meta['filesystem']}\ncommand: {meta['command']}\n")
    for res in results:
        print(header(res, meta) + "\n" + rank_table(res["rows"]) + "\n")
    print(f"### All ranks of a world (one machine): {results[0]['what']}\n\nothers' CPU: CPU time of "
          "processes outside the world while it ran (start-up included), as a share of all cores (noise); "
          f"load average {' '.join(f'{x:.2f}' for x in meta['loadavg_start'])} at start, "
          f"{' '.join(f'{x:.2f}' for x in meta['loadavg_end'])} at end.\n")
    print(node_table(results, results[0]["checkpoint_bytes"]) + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": meta, "tp_results": results}, indent=2) + "\n")
    failed = [f"TP={res['world']} {r['label']}" for res in results for r in res["rows"] if r["status"] != "ok"]
    if failed:
        print(f"bench: failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0
