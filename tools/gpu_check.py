#!/usr/bin/env python
"""One prepared GPU check (issue 18): proves the CUDA path in one run of a few minutes.

    python tools/gpu_check.py OUT_DIR              # on a CUDA host, from the repository root
    python tools/gpu_check.py --dry-run OUT_DIR    # anywhere: CUDA parts skipped, tiny sizes

Steps, cheap correctness first (a run cut short still tells something); each but the first runs
in its own process group with a time budget, and a failure or timeout is recorded, not fatal:

    environment  torch / CUDA versions, device name, capability, memory
    equality     stream_quantize(ckpt, "cuda") vs stream_quantize(ckpt, "cpu"): FP8 bytes and
                 scales, per granularity (tensor, channel, block), a small and a large ring
    tests        python -m pytest -k cuda tests/test_device.py tests/test_load_into.py
    checkpoint   a generated llama-shaped bf16 checkpoint (4 GiB; dry run 32 MiB)
    memory       stream_quantize of it: report.device_peak vs model.nbytes, host peak
    bench        tools/bench.py --device cuda on it: pinned H2D ceiling, load_file / safe_open
                 + the same quantizer, mmapload per io mode (warm page cache)

Writes OUT_DIR/gpu_check.json (every number, each step's status and error) and OUT_DIR/gpu_check.md
(one table: step | check | status | result | target), both rewritten after every step. Exit code 1
if a check failed, errored or timed out; targets (>= 0.80 x pinned H2D, device peak / retained <=
1.10) are reported as met / missed without failing the run. Nothing is installed or downloaded:
the package is imported from this checkout (PYTHONPATH is set for the child processes).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MiB, GiB = 1 << 20, 1 << 30
ORDER = ["environment", "equality", "tests", "checkpoint", "memory", "bench"]
MODES = {  # seconds per step (a cap, not an estimate) and in all; the GPU run stays under 6 minutes
    "gpu": dict(device="cuda", size=4 * GiB, ring=256 * MiB, total=330, strategies="naive,safe_open,mmapload",
                budget=dict(equality=60, tests=150, checkpoint=90, memory=60, bench=180)),
    "dry": dict(device="cpu", size=32 * MiB, ring=16 * MiB, total=150,
                strategies="naive,mmapload:mmap,mmapload:direct",
                budget=dict(equality=30, tests=40, checkpoint=20, memory=20, bench=60))}
BAD = ("failed", "timeout", "error")      # statuses that make the exit code non-zero
MARK = "@gpu-check "                      # prefix of a child step's one result line
COLUMNS = ["step", "check", "status", "result", "target"]
H2D_TARGET, PEAK_TARGET = 0.80, 1.10      # issue 4: >= 80 % of pinned H2D, device peak / retained <= 1.1
T0 = time.perf_counter()


def say(msg: str) -> None:
    print(f"[gpu_check {time.perf_counter() - T0:6.1f}s] {msg}", flush=True)


# -- child steps: `gpu_check.py --child STEP ...` prints MARK + one JSON line -------------------
def child_equality(device: str, work: Path, dry: bool) -> dict:
    import torch
    from mmapload import QuantizedTensor, stream_quantize
    from mmapload.synth import make_llama_checkpoint
    ckpt = make_llama_checkpoint(work / "eq", (2 if dry else 24) * MiB, shards=2, seed=1)
    rings = (256 << 10,) if dry else (2 * MiB, 64 * MiB)   # small slots: big tensors in pieces, groups held
    out = {}
    for gran in ("tensor", "channel", "block"):
        n = q = 0
        bad = []
        for ring in rings:
            opts = dict(ring_bytes=ring, granularity=gran, policy="names")
            ref, got = stream_quantize(ckpt, "cpu", **opts), stream_quantize(ckpt, device, **opts)
            for name, t in ref.items():
                d, n = got[name], n + 1
                if isinstance(t, QuantizedTensor):
                    q += 1
                    same = (isinstance(d, QuantizedTensor) and d.data.device.type == torch.device(device).type
                            and torch.equal(d.data.cpu().view(torch.uint8), t.data.view(torch.uint8))
                            and torch.equal(d.scale.cpu(), t.scale))
                else:
                    same = torch.equal(d.cpu(), t)
                if not same:
                    bad.append(f"{name} (ring {ring >> 10} KiB)")
        out[gran] = {"status": "failed" if bad else "ok", "tensors": n, "quantized": q, "mismatches": bad[:10],
                     "compared": f"{device} vs cpu", "rings": list(rings)}
    return {"status": "failed" if any(g["status"] != "ok" for g in out.values()) else "ok", "granularities": out}


def child_checkpoint(size: int, work: Path) -> dict:
    sys.path.insert(0, str(ROOT / "tools"))
    import bench                             # its generated checkpoint, at the path its --keep reuses
    from mmapload.checkpoint import open_checkpoint
    path, reused = bench.checkpoint_for(size, work)
    ckpt = open_checkpoint(path)
    return {"status": "ok", "path": str(path), "bytes": ckpt.total_bytes, "shards": len(ckpt.shards),
            "largest_tensor_bytes": ckpt.largest.nbytes, "reused": reused}


def child_memory(device: str, work: Path, size: int, ring: int) -> dict:
    import torch
    from mmapload import stream_quantize
    ckpt = child_checkpoint(size, work)
    cuda = device.startswith("cuda")
    if cuda:                                 # the CUDA context is not the load's
        torch.zeros(1, device=device)
        torch.cuda.synchronize()
    base = torch.cuda.memory_allocated() if cuda else 0
    model = stream_quantize(ckpt["path"], device, ring_bytes=ring, policy="names")
    r = model.report
    peak = None if r.device_peak is None else r.device_peak - base
    bound = model.nbytes + ckpt["largest_tensor_bytes"] + 64 * MiB   # tests/test_device.py's contract
    return {"status": "failed" if peak is not None and peak > bound else "ok", "device_peak": peak,
            "retained": model.nbytes, "ratio": None if peak is None else peak / model.nbytes, "contract_bound": bound,
            "ring_bytes": ring, "host_peak_above": r.peak_rss - r.rss_before, "host_peak_anon": r.peak_rss_anon,
            "seconds": r.seconds, "gbps": r.gbps, "pinned": r.pinned, "read_threads": r.read_threads,
            "stage_seconds": r.stage_seconds}


# -- steps run from here -----------------------------------------------------------------------
def run_proc(cmd: list[str], timeout: float, tag: str) -> tuple[int | None, list[str], dict | None]:
    """Run ``cmd`` in its own process group, echoing its output: (rc, or None on timeout; tail; result)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         start_new_session=True)
    tail, result = collections.deque(maxlen=30), []

    def pump():
        for line in p.stdout:
            if line.startswith(MARK):
                result.append(json.loads(line[len(MARK):]))
            else:
                tail.append(line.rstrip("\n"))
                print(f"    {tag}| {line}", end="", flush=True)
    t = threading.Thread(target=pump, daemon=True)
    t.start()
    try:
        rc = p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)     # the step and whatever it started (bench's loaders)
        p.wait()
        rc = None
    t.join(10)
    return rc, list(tail), result[-1] if result else None


def broken(rc: int | None, tail: list[str], timeout: float, what: str = "") -> dict:
    if rc is None:
        return {"status": "timeout", "error": f"ran past its {timeout:.0f} s budget", "tail": tail[-12:]}
    return {"status": "error", "error": f"exit {rc}, {what}", "tail": tail[-12:]}


def step_child(step: str, args, timeout: float) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", step, "--device", args.device,
           "--work", str(args.work), "--size", str(args.size), "--ring", str(args.ring)]
    rc, tail, res = run_proc(cmd + ["--dry-run"] * args.dry_run, timeout, step)
    return res if rc is not None and res is not None else broken(rc, tail, timeout, "no result")


def step_tests(args, timeout: float) -> dict:
    junit = args.work / "junit.xml"
    rc, tail, _ = run_proc([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "cuda",
                            f"--junitxml={junit}", "tests/test_device.py", "tests/test_load_into.py"], timeout, "pytest")
    try:
        suite = ET.parse(junit).getroot()
        suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
        c = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    except (OSError, ET.ParseError, AttributeError) as e:
        return broken(rc, tail, timeout, f"no junit report ({e})")
    failed = [f"{tc.get('classname')}::{tc.get('name')}" for tc in suite.iter("testcase")
              if tc.find("failure") is not None or tc.find("error") is not None]
    counts = {"passed": c["tests"] - c["failures"] - c["errors"] - c["skipped"], "failed": c["failures"],
              "errors": c["errors"], "skipped": c["skipped"]}
    bad = rc != 0 or counts["failed"] or counts["errors"] or (args.cuda and not counts["passed"])
    return {"status": "failed" if bad else "ok", "returncode": rc, **counts, "failed_tests": failed,
            "summary": tail[-1] if tail else ""}


def step_bench(args, timeout: float) -> dict:
    out = args.work / "bench.json"
    rc, tail, _ = run_proc([sys.executable, "tools/bench.py", "--device", args.device, "--sizes", str(args.size),
                            "--strategies", args.strategies, "--policy", "names", "--ring-bytes", str(args.ring),
                            "--keep", str(args.work), "--timeout", str(int(timeout / 3)), "--json", str(out)]
                           + ["--threads", "1"] * args.dry_run, timeout, "bench")
    try:
        (res,) = json.loads(out.read_text())["results"]
    except (OSError, ValueError) as e:
        return broken(rc, tail, timeout, f"no JSON ({e})")
    total, stages = res["checkpoint_bytes"], res["ceiling"]["stages"]
    h2d = total / stages["h2d"]["seconds"] / 1e9 if "h2d" in stages else None
    rows = [{k: r.get(k) for k in ("label", "status", "reason", "seconds", "gbps", "x_ceiling", "peak_rss_above",
                                   "transient_above", "peak_dev_alloc", "retained_bytes")} for r in res["rows"]]
    for r in rows:
        r["x_h2d"] = r["gbps"] / h2d if h2d and r["gbps"] else None
    ours = [r for r in rows if r["label"].startswith("mmapload")]
    return {"status": "ok" if rc == 0 and ours and all(r["status"] == "ok" for r in ours) else "failed",
            "returncode": rc, "checkpoint_bytes": total, "h2d_gbps": h2d, "rows": rows,
            "ceiling": {k: {"seconds": v["seconds"], "gbps": total / v["seconds"] / 1e9, "how": v["how"]}
                        for k, v in stages.items()}}


def step_environment(args) -> dict:
    import safetensors
    import torch
    env = {"status": "ok", "torch": torch.__version__, "torch_cuda": torch.version.cuda, "safetensors":
           safetensors.__version__, "python": platform.python_version(), "cpus": os.cpu_count(),
           "cuda": torch.cuda.is_available(), "dry_run": args.dry_run, "commit": None}
    try:
        env["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                       text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        pass                                 # a copy without .git
    if env["cuda"]:
        p = torch.cuda.get_device_properties(0)
        env.update(device_name=p.name, capability=list(torch.cuda.get_device_capability(0)),
                   device_memory=p.total_memory, device_count=torch.cuda.device_count())
    elif not args.dry_run:
        env.update(status="failed", error="no CUDA device: run with --dry-run on a CPU machine")
    return env


# -- report ------------------------------------------------------------------------------------
def _mib(b) -> str:
    return "-" if b is None else f"{b / MiB:,.0f} MiB"


def _met(ok: bool) -> str:
    return "met" if ok else "missed"


def table_rows(steps: dict, args) -> list[list[str]]:
    rows = []
    for name in ORDER:
        s = steps.get(name)
        add = lambda check, status, result, target="-": rows.append([name, check, status, result, target])  # noqa: E731
        if s is None:
            add("-", "not run", "-")
        elif s["status"] != "ok" and ("error" in s or s["status"].startswith("skipped")):
            add("-", s["status"], s.get("error", "")[:160])
        elif name == "environment":
            dev = (f"{s['device_name']}, sm_{''.join(map(str, s['capability']))}, {s['device_memory'] / GiB:.1f} GiB"
                   if s["cuda"] else "no CUDA")
            add("device", s["status"], f"{dev}; torch {s['torch']} (CUDA {s['torch_cuda']})")
        elif name == "equality":
            for g, r in s["granularities"].items():
                add(f"bit-equality {g}", r["status"] if args.cuda else args.skip,
                    f"{r['compared']}: {r['tensors']} tensors ({r['quantized']} FP8), {len(r['rings'])} ring(s)"
                    + (f"; differ: {', '.join(r['mismatches'][:3])}" if r["mismatches"] else ""), "bit-identical")
        elif name == "tests":
            add("pytest -k cuda (test_device, test_load_into)", s["status"], f"{s['passed']} passed, "
                f"{s['failed']} failed, {s['errors']} errors, {s['skipped']} skipped",
                "all pass" if args.cuda else "all skip (no CUDA)")
        elif name == "checkpoint":
            add("generated llama bf16", s["status"], f"{s['bytes'] / 1e9:.2f} GB, {s['shards']} shards, "
                f"largest tensor {_mib(s['largest_tensor_bytes'])}")
        elif name == "memory":
            if s["device_peak"] is None:
                add("device peak / retained", args.skip, f"retained {_mib(s['retained'])}")
            else:
                add("device peak / retained", s["status"], f"{s['ratio']:.3f} ({_mib(s['device_peak'])} / "
                    f"{_mib(s['retained'])})", f"<= {PEAK_TARGET} ({_met(s['ratio'] <= PEAK_TARGET)}; "
                    f"contract <= {_mib(s['contract_bound'])})")
            add("host peak above start", s["status"], f"{_mib(s['host_peak_above'])} (ring {_mib(s['ring_bytes'])}"
                f", {s['gbps']:.2f} GB/s)")
        elif name == "bench":
            h2d = s["h2d_gbps"]
            add("pinned H2D ceiling", "ok" if h2d else args.skip, f"{h2d:.2f} GB/s" if h2d else "-")
            for r in s["rows"]:
                if r["status"] != "ok":
                    add(r["label"], r["status"], (r["reason"] or "")[:160])
                    continue
                target = (f">= {H2D_TARGET:.2f} x pinned H2D ({_met(r['x_h2d'] >= H2D_TARGET)})"
                          if r["label"].startswith("mmapload") and r["x_h2d"] else "-")
                add(r["label"], "ok", f"{r['seconds']:.2f} s, {r['gbps']:.2f} GB/s"
                    + (f" = {r['x_h2d']:.2f} x pinned H2D" if r["x_h2d"] else "")
                    + f"; host peak {_mib(r['peak_rss_above'])}, device peak {_mib(r['peak_dev_alloc'])}", target)
    return rows


def write_report(out: Path, report: dict, args) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    lines = [f"# gpu_check: {'dry run (CPU), ' if args.dry_run else ''}device {args.device}, "
             f"{report['seconds']:.0f} s, {'ok' if report['ok'] else 'FAILED'}", "",
             "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(c.replace("|", "/").replace("\n", " ") for c in row) + " |"
              for row in table_rows(report["steps"], args)]
    (out / "gpu_check.md").write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path, nargs="?", help="folder for gpu_check.json and gpu_check.md")
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes, CUDA parts reported as skipped")
    ap.add_argument("--tmp", type=Path, default=ROOT, help="where the work folder (checkpoints) goes "
                    "(default: the repository root, on disk; removed at the end)")
    ap.add_argument("--child", choices=["equality", "checkpoint", "memory"], help=argparse.SUPPRESS)
    for hidden in ("--device", "--work", "--size", "--ring"):
        ap.add_argument(hidden, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        if args.dry_run:                     # tiny sizes on a small, maybe shared CPU: one torch thread
            import torch
            torch.set_num_threads(1)
        work, size, ring = Path(args.work), int(args.size), int(args.ring)
        fn = {"equality": lambda: child_equality(args.device, work, args.dry_run),
              "checkpoint": lambda: child_checkpoint(size, work),
              "memory": lambda: child_memory(args.device, work, size, ring)}[args.child]
        print(MARK + json.dumps(fn(), default=str), flush=True)
        return 0
    if args.out is None:
        ap.error("the output folder is required")
    mode = MODES["dry" if args.dry_run else "gpu"]
    args.device, args.size, args.ring, args.strategies = mode["device"], mode["size"], mode["ring"], mode["strategies"]
    args.cuda, args.skip = False, "skipped (no CUDA)"
    args.work = Path(tempfile.mkdtemp(prefix=".gpu-check-", dir=args.tmp))
    report = {"tool": "tools/gpu_check.py", "format": 1, "dry_run": args.dry_run, "device": args.device,
              "size": args.size, "ring_bytes": args.ring, "budget_s": mode["total"], "steps": {}, "seconds": 0.0,
              "ok": False}
    steps = {"tests": step_tests, "bench": step_bench, "equality": lambda a, b: step_child("equality", a, b),
             "checkpoint": lambda a, b: step_child("checkpoint", a, b), "memory": lambda a, b: step_child("memory", a, b)}
    try:
        for name in ORDER:
            budget = min(mode["budget"][name], T0 + mode["total"] - time.perf_counter()) if name in steps else None
            say(f"{name} ..." + (f" (budget {budget:.0f} s)" if budget else ""))
            t = time.perf_counter()
            try:
                if name == "environment":
                    s = step_environment(args)
                    args.cuda = s["cuda"] and not args.dry_run
                    args.skip = "skipped (dry run)" if s["cuda"] else "skipped (no CUDA)"
                elif budget < 5:
                    s = {"status": "timeout", "error": "not run: the run's time budget is spent"}
                else:
                    s = steps[name](args, budget)
            except Exception as e:  # noqa: BLE001 - recorded; the next step still runs
                s = {"status": "error", "error": f"{type(e).__name__}: {e}"}
            s.update(seconds=time.perf_counter() - t, budget_s=budget)
            report["steps"][name] = s
            say(f"{name}: {s['status']} in {s['seconds']:.1f} s" + (f" ({s['error']})" if s.get("error") else ""))
            report.update(seconds=time.perf_counter() - T0, ok=not any(v["status"] in BAD for v in report["steps"].values()))
            write_report(args.out, report, args)
    finally:
        shutil.rmtree(args.work, ignore_errors=True)
    print("\n" + (args.out / "gpu_check.md").read_text(), flush=True)
    say(f"wrote {args.out / 'gpu_check.json'} and gpu_check.md: {'ok' if report['ok'] else 'FAILED'}")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
