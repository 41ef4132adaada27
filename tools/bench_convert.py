"""tools/bench.py --convert: ``mmapload.convert`` against llm-compressor's model-free path.

Both turn the same generated bf16 llama checkpoint into a compressed-tensors FP8 checkpoint, each
run in a fresh process (the tool imported first; import time reported apart), the source's page
cache warm or cold before each run, the runs of the two tools interleaved:

    mmapload        convert(src, dst, granularity=channel | block)
    llmcompressor   model_free_ptq(src, dst, scheme="FP8_DYNAMIC" | "FP8_BLOCK",
                                   ignore=["lm_head", "re:.*embed_tokens$"], device="cpu")
                    (its own name rule quantizes every `.weight` but norms: without the `ignore`
                    it quantizes the embedding too)

Seconds are the call's plus an fsync of every output file (convert's output is durable when it
returns; model_free_ptq's is not), median of --repeat. Memory: VmHWM and RssAnon / RssFile
peaks (sampled every 20 ms) above the process's own after its imports. "others' CPU": busy CPU
seconds of the machine (/proc/stat) not spent by the run (interference).

Then the two outputs are compared tensor by tensor: the same names, shapes and kept tensors;
every FP8 code within one step of the other's; each scale against the other's (compressed-tensors
stores the scale in the weight's dtype: bf16 here, mmapload float32); and each output's relative
RMS error against the bf16 source.

llm-compressor pins transformers / compressed-tensors other than mmapload's tests, so it lives in
a venv of its own: --llmc-python PATH (default: this interpreter; the row is skipped with the
reason when it cannot import llmcompressor).

    python tools/bench.py --convert --sizes 1536MiB --repeat 3 --llmc-python /path/venv/bin/python
    python tools/bench.py --convert --cold --granularity block --llmc-python ...
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

MiB = 1 << 20
SCHEMES = {"channel": "FP8_DYNAMIC", "block": "FP8_BLOCK"}
_RESULT = "BENCH_CONVERT "

CHILD = r'''
import json, os, sys, threading, time
tool, src, dst, granularity, scale_dtype = sys.argv[1:6]
t0 = time.perf_counter()
if tool == "mmapload":
    from mmapload import convert
else:
    from llmcompressor import model_free_ptq
imports = time.perf_counter() - t0

def status():
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                out[k] = int(v.split()[0]) * 1024
    return out

base = status()
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")            # VmHWM := VmRSS: the peak from here on
peak, stop = {"RssAnon": 0, "RssFile": 0}, threading.Event()

def sample():
    while not stop.wait(0.02):
        s = status()
        for k in peak:
            peak[k] = max(peak[k], s[k])

th = threading.Thread(target=sample, daemon=True)
th.start()
c0, t1 = os.times(), time.perf_counter()
if tool == "mmapload":
    convert(src, dst, granularity=granularity, scale_dtype=scale_dtype)
else:
    model_free_ptq(src, dst, scheme={"channel": "FP8_DYNAMIC", "block": "FP8_BLOCK"}[granularity],
                   ignore=["lm_head", "re:.*embed_tokens$"], max_workers=1, device="cpu")
call = time.perf_counter() - t1
for name in sorted(os.listdir(dst)):      # durable, as convert's output is when it returns
    fd = os.open(os.path.join(dst, name), os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)
fd = os.open(dst, os.O_RDONLY)
os.fsync(fd)
os.close(fd)
total = time.perf_counter() - t1
c1 = os.times()
stop.set()
th.join()
end = status()
print("BENCH_CONVERT " + json.dumps({
    "imports": imports, "call": call, "fsync": total - call, "seconds": total,
    "cpu": (c1.user - c0.user) + (c1.system - c0.system),
    "cpu_children": (c1.children_user - c0.children_user) + (c1.children_system - c0.children_system),
    "base_rss": base["VmRSS"], "vmhwm": end["VmHWM"], "peak_anon": peak["RssAnon"], "peak_file": peak["RssFile"],
    "base_anon": base["RssAnon"], "base_file": base["RssFile"],
    "out_bytes": sum(os.path.getsize(os.path.join(dst, n)) for n in os.listdir(dst) if n.endswith(".safetensors"))}),
    flush=True)
'''


def _python_for(tool: str, args) -> str:
    return (args.llmc_python or sys.executable) if tool == "llmcompressor" else sys.executable


def _can_run(python: str, module: str) -> str | None:
    """None when ``python`` imports ``module``, else why not (one line)."""
    done = subprocess.run([python, "-c", f"import {module}"], capture_output=True, text=True, timeout=300)
    if done.returncode == 0:
        return None
    return (done.stderr.strip().splitlines() or ["import failed"])[-1][:200]


def run_once(tool: str, python: str, src: Path, dst: Path, granularity: str, timeout: float, busy,
             scale_dtype: str = "float32") -> dict:
    shutil.rmtree(dst, ignore_errors=True)
    b0 = busy()
    done = subprocess.run([python, "-c", CHILD, tool, str(src), str(dst), granularity, scale_dtype], capture_output=True,
                          text=True, timeout=timeout)
    b1 = busy()
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith(_RESULT)]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"{tool} failed (exit {done.returncode}): "
                           + " | ".join(done.stderr.strip().splitlines()[-3:])[:600])
    r = json.loads(lines[-1].removeprefix(_RESULT))
    if b0 is not None and b1 is not None:   # the run's whole process tree ran in the window
        r["others_cpu"] = max(0.0, (b1 - b0) - r["cpu"] - r["cpu_children"] - r["imports"])
    return r


# -- the outputs, side by side ------------------------------------------------------------------
def _fp8_magnitude(q: torch.Tensor) -> torch.Tensor:
    """e4m3 / e5m2 codes as signed ints ordered like their values (sign-magnitude -> +-magnitude)."""
    u = q.view(torch.uint8).to(torch.int16)
    return torch.where(u >= 128, -(u - 128), u)


def _expand(scale: torch.Tensor, shape) -> torch.Tensor:
    """A [rows, 1] or block [ceil(r/b), ceil(c/b)] scale grid expanded to ``shape``."""
    s = scale.float()
    if s.numel() == 1:
        return s.reshape(1, 1).expand(shape)
    if s.shape[1] == 1:
        return s.expand(shape)
    br, bc = -(-shape[0] // s.shape[0]), -(-shape[1] // s.shape[1])
    return s.repeat_interleave(br, 0)[:shape[0]].repeat_interleave(bc, 1)[:, :shape[1]]


def compare(src: Path, ours: Path, theirs: Path) -> dict:
    """mmapload's output against llm-compressor's, and each against the bf16 source."""
    from safetensors import safe_open

    def index(folder: Path) -> dict[str, Path]:
        out = {}
        for f in sorted(folder.glob("*.safetensors")):
            with safe_open(f, "pt") as h:
                out.update({k: f for k in h.keys()})
        return out

    def get(where: dict, name: str) -> torch.Tensor:
        with safe_open(where[name], "pt") as h:
            return h.get_tensor(name)

    si, oi, ti = index(src), index(ours), index(theirs)
    res = {"same_names": set(oi) == set(ti), "only_ours": sorted(set(oi) - set(ti))[:5],
           "only_theirs": sorted(set(ti) - set(oi))[:5], "weights": 0, "elements": 0, "codes_differ": 0,
           "codes_off_by_more_than_one": 0, "kept_differ": [], "scale_dtypes": set(), "scales": 0,
           "theirs_scale_is_bf16_of_ours": 0, "max_scale_rel_diff": 0.0, "byte_equal_weights": 0,
           "err2_ours": 0.0, "err2_theirs": 0.0, "ref2": 0.0}
    for name in sorted(set(oi) & set(ti)):
        if name.endswith("_scale"):
            continue
        a, b = get(oi, name), get(ti, name)
        if a.dtype not in (torch.float8_e4m3fn, torch.float8_e5m2):
            if a.dtype != b.dtype or not torch.equal(a, b):
                res["kept_differ"].append(name)
            continue
        sa, sb = get(oi, name + "_scale"), get(ti, name + "_scale")
        res["scale_dtypes"].add(f"{sa.dtype} vs {sb.dtype}".replace("torch.", ""))
        res["weights"] += 1
        res["elements"] += a.numel()
        d = (_fp8_magnitude(a) - _fp8_magnitude(b)).abs()
        res["codes_differ"] += int((d != 0).sum())
        res["codes_off_by_more_than_one"] += int((d > 1).sum())
        res["byte_equal_weights"] += int(sa.dtype == sb.dtype and sa.shape == sb.shape and torch.equal(sa, sb)
                                         and torch.equal(a.view(torch.uint8), b.view(torch.uint8)))
        res["scales"] += sa.numel()
        res["theirs_scale_is_bf16_of_ours"] += int((sa.to(sb.dtype) == sb).sum())
        res["max_scale_rel_diff"] = max(res["max_scale_rel_diff"],
                                        float(((sa.float() - sb.float()).abs() / sa.float()).max()))
        w = get(si, name).float()
        res["ref2"] += float((w * w).sum())
        for key, q, s in (("err2_ours", a, sa), ("err2_theirs", b, sb)):
            res[key] += float(((q.float() * _expand(s, q.shape) - w) ** 2).sum())
    res["scale_dtypes"] = sorted(res["scale_dtypes"])
    ref = res.pop("ref2") or 1.0
    res["rel_rms_ours"] = (res.pop("err2_ours") / ref) ** 0.5
    res["rel_rms_theirs"] = (res.pop("err2_theirs") / ref) ** 0.5
    return res


# -- the run ------------------------------------------------------------------------------------
def _summary(runs: list[dict]) -> dict:
    out = {k: statistics.median(r[k] for r in runs) for k in ("seconds", "call", "fsync", "imports")}
    out["cpu"] = statistics.median(r["cpu"] + r["cpu_children"] for r in runs)   # mmapload's policy child too
    out["seconds_min"], out["seconds_max"] = min(r["seconds"] for r in runs), max(r["seconds"] for r in runs)
    others = [r["others_cpu"] for r in runs if "others_cpu" in r]
    out["others_cpu"] = max(others) if others else None
    for k, base in (("vmhwm", "base_rss"), ("peak_anon", "base_anon"), ("peak_file", "base_file")):
        out[k] = max(r[k] for r in runs)
        out[k + "_above"] = max(r[k] - r[base] for r in runs)
    out["base_rss"] = statistics.median(r["base_rss"] for r in runs)
    out["out_bytes"] = runs[-1]["out_bytes"]
    return out


def table(rows: list[dict]) -> str:
    cols = ["tool", "seconds (median)", "min-max", "of which fsync", "x mmapload", "imports s", "CPU s",
            "others' CPU s", "peak RSS (VmHWM) above base MiB", "peak anon above base MiB", "peak file MiB",
            "base RSS MiB", "output bytes"]
    base = next((r for r in rows if r["tool"] == "mmapload" and r["status"] == "ok"), None)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {r['tool']} | {r['status']}: {r['reason']} |" + " |" * (len(cols) - 2))
            continue
        s = r["summary"]
        x = f"{s['seconds'] / base['summary']['seconds']:.2f}" if base else "-"
        oc = "-" if s["others_cpu"] is None else f"{s['others_cpu']:.1f}"
        lines.append(f"| {r['tool']} | {s['seconds']:.2f} | {s['seconds_min']:.2f}-{s['seconds_max']:.2f} | "
                     f"{s['fsync']:.2f} | {x} | {s['imports']:.1f} | {s['cpu']:.1f} | {oc} | "
                     f"{s['vmhwm_above'] / MiB:,.0f} | {s['peak_anon_above'] / MiB:,.0f} | {s['peak_file'] / MiB:,.0f} | "
                     f"{s['base_rss'] / MiB:,.0f} | {s['out_bytes']:,} |")
    return "\n".join(lines)


def run_convert(args, b) -> int:
    """``b``: tools/bench.py's helpers (checkpoints, page cache, /proc/stat)."""
    if args.granularity not in SCHEMES:
        raise SystemExit(f"bench: --convert compares channel or block (model_free_ptq has no per-tensor "
                         f"FP8 preset without static activations), got --granularity {args.granularity}")
    cold = b.probe_cold_method(args.cold_method) if args.cold else None
    root, tmp = b.bench_root(args)
    failed = []
    try:
        for size in args.sizes:
            src, reused = b.checkpoint_for(size, root)
            paths = [str(s.path) for s in b.open_checkpoint(src).shards]
            rows = []
            for tool, module in (("mmapload", "mmapload"), ("llmcompressor", "llmcompressor")):
                why = _can_run(_python_for(tool, args), module)
                rows.append({"tool": tool, "status": "skipped" if why else "ok", "reason": why or "", "runs": []})
            for _ in range(args.repeat):            # interleaved: A B A B ...
                for row in rows:
                    if row["status"] != "ok":
                        continue
                    b.prepare(paths, cold)
                    try:
                        row["runs"].append(run_once(row["tool"], _python_for(row["tool"], args), src,
                                                    root / f"out-{row['tool']}", args.granularity, args.timeout,
                                                    b._busy_seconds, args.scale_dtype))
                    except (RuntimeError, subprocess.TimeoutExpired) as e:
                        row.update(status="failed", reason=str(e)[:600])
            for row in rows:
                if row["status"] == "ok":
                    row["summary"] = _summary(row["runs"])
                elif row["status"] == "failed" and row["tool"] == "mmapload":
                    failed.append(row["tool"])
            print(f"### convert, {b.size_name(size)} checkpoint ({sum(map(os.path.getsize, paths)):,} bytes, "
                  f"{len(paths)} shards{', reused' if reused else ''}), granularity {args.granularity}, "
                  f"mmapload scale_dtype {args.scale_dtype}, "
                  f"{'cold' if cold else 'warm'} page cache, median of {args.repeat}\n")
            print(table(rows) + "\n")
            result = {"size": size, "rows": rows}
            if all(r["status"] == "ok" for r in rows):
                cmp = compare(src, root / "out-mmapload", root / "out-llmcompressor")
                result["compare"] = cmp
                print(f"outputs: same tensor names {cmp['same_names']}; {cmp['weights']} FP8 weights, "
                      f"{cmp['elements']:,} elements: {cmp['codes_differ']:,} FP8 codes differ "
                      f"({cmp['codes_differ'] / max(cmp['elements'], 1):.2%}), {cmp['codes_off_by_more_than_one']:,} "
                      f"by more than one step; scales {', '.join(cmp['scale_dtypes'])}: "
                      f"{cmp['theirs_scale_is_bf16_of_ours']:,} of {cmp['scales']:,} of theirs are ours rounded "
                      f"to their dtype (largest relative difference {cmp['max_scale_rel_diff']:.2%}); kept tensors "
                      f"that differ: {len(cmp['kept_differ'])}; relative RMS error against the bf16 source: "
                      f"mmapload {cmp['rel_rms_ours']:.6f}, llmcompressor {cmp['rel_rms_theirs']:.6f}; "
                      f"byte-equal FP8 weights (codes and scales): {cmp['byte_equal_weights']} of {cmp['weights']}\n")
            if args.json:
                with open(args.json, "a") as f:
                    f.write(json.dumps({"convert": result, "granularity": args.granularity,
                                        "scale_dtype": args.scale_dtype,
                                        "cache": "cold" if cold else "warm", "time": time.time()}) + "\n")
            for row in rows:
                shutil.rmtree(root / f"out-{row['tool']}", ignore_errors=True)
    finally:
        b.cleanup(tmp)
    if failed:
        print(f"bench: mmapload's convert failed: {failed}", file=sys.stderr)
        return 1
    return 0
