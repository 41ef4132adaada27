#!/usr/bin/env python
"""Load one bf16 checkpoint in vLLM (CPU) four ways, each in a fresh process; memory and seconds.

    bf16        vLLM's default loader on the bf16 checkpoint (the bf16 model; the baseline of the ratios)
    online_fp8  the same with quantization="fp8_per_channel" (vLLM's online FP8: loads bf16, then quantizes)
    mmapload    --load-format mmapload (mmapload/integrations/vllm.py), ring_bytes = --ring-bytes
    converted   the default loader on mmapload.convert(src, dst, granularity="channel") (the FP8 floor)

Each way runs in a fresh child (this script, --child) with VLLM_ENABLE_V1_MULTIPROCESSING=0 (the
engine in-process: one process holds everything), VLLM_CPU_KVCACHE_SPACE=1, enforce_eager, no
tokenizer, bf16. The child wraps the outermost BaseModelLoader.load_model (the plugin's override
included): at entry it records the "vLLM runtime baseline" (VmRSS / RssAnon / RssFile) and resets VmHWM
(/proc/self/clear_refs "5"), so VmHWM at exit is the load's peak (a 10 ms VmRSS sampler stands in where
the reset does not work); anon / file-backed peaks are sampled (10 ms). Then it generates 1 token from
a token-id prompt (the model runs; the FP8 ways' tokens and logprobs should agree).
Target (the plugin row): load peak above baseline <= FP8 model (the converted checkpoint's bytes) +
ring + 200 MiB. The page cache is warm: each way's checkpoint is read once before its child starts.

    /work/vllm-venv/bin/python tools/bench_vllm.py                      # ~1.5 GiB synthetic llama
    /work/vllm-venv/bin/python tools/bench_vllm.py --gib 0.5 --ways bf16,mmapload --json out.json
    /work/vllm-venv/bin/python tools/bench_vllm.py --model /path/to/bf16-ckpt --ring-bytes 64MiB
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

MiB = 1 << 20
SLACK = 200 * MiB
KEYS = ("VmRSS", "VmHWM", "RssAnon", "RssFile")
WAYS = {"bf16": "default loader, bf16 ckpt", "online_fp8": "online fp8_per_channel",
        "mmapload": "--load-format mmapload", "converted": "default loader, converted FP8 ckpt (floor)"}
PROMPT = [1, 17, 42, 99, 250, 311, 7, 400]


# ---------------------------------------------------------------- child: one vLLM LLM() in this process
def status() -> dict:
    """VmRSS / VmHWM / RssAnon / RssFile of this process, bytes."""
    with open("/proc/self/status") as f:
        return {k: int(v.split()[0]) << 10 for k, _, v in (ln.partition(":") for ln in f) if k in KEYS}


class Sampler(threading.Thread):
    """Peaks of VmRSS / RssAnon / RssFile every 10 ms: over the run and over a window (the load)."""

    def __init__(self):
        super().__init__(daemon=True)
        self.run_peak, self.win = status(), None

    def run(self):
        while True:
            s = status()
            for d in (self.run_peak, self.win):
                if d is not None:
                    d.update({k: max(d.get(k, 0), s[k]) for k in ("VmRSS", "RssAnon", "RssFile")})
            time.sleep(0.01)


def hook_load_model(rec: dict, sampler: Sampler) -> None:
    """Wrap every load_model of BaseModelLoader and its subclasses; the outermost call is measured."""
    from vllm.model_executor.model_loader.base_loader import BaseModelLoader
    from vllm.plugins import load_general_plugins
    load_general_plugins()   # registers the mmapload loader class, so it is wrapped too (vLLM loads plugins once)

    def wrap(f):
        def load_model(self, *a, **kw):
            if "base" in rec:   # an inner (super()) call, or a later load
                return f(self, *a, **kw)
            rec["base"] = base = status()
            with open("/proc/self/clear_refs", "w") as cr:
                cr.write("5")   # VmHWM := VmRSS
            s = status()
            rec["hwm_before"], rec["hwm_reset"] = base["VmHWM"], s["VmHWM"] <= s["VmRSS"] + 4 * MiB
            sampler.win, t0 = dict(s), time.perf_counter()
            try:
                return f(self, *a, **kw)
            finally:
                rec["load_s"], rec["exit"], rec["win"] = time.perf_counter() - t0, status(), dict(sampler.win)
                sampler.win = None
        return load_model

    classes = [BaseModelLoader]
    for cls in classes:   # breadth first over the subclass tree (no diamonds among vLLM's loaders)
        classes += cls.__subclasses__()
        if "load_model" in cls.__dict__:
            cls.load_model = wrap(cls.__dict__["load_model"])


def child(spec: dict, out: Path) -> None:
    sampler = Sampler()
    sampler.start()
    rec: dict = {}
    hook_load_model(rec, sampler)
    from vllm import LLM, SamplingParams
    generate = spec.pop("generate", True)
    t0 = time.perf_counter()
    llm = LLM(skip_tokenizer_init=True, dtype="bfloat16", enforce_eager=True, seed=0, max_num_seqs=1, **spec)
    rec["init_s"] = time.perf_counter() - t0
    if "base" not in rec:
        raise RuntimeError("BaseModelLoader.load_model was not called: the measurement hook missed the load")
    if generate:
        t0 = time.perf_counter()
        o = llm.generate([{"prompt_token_ids": PROMPT}], SamplingParams(
            max_tokens=1, temperature=0.0, logprobs=1, detokenize=False), use_tqdm=False)[0].outputs[0]
        rec["gen_s"], rec["token"] = time.perf_counter() - t0, o.token_ids[0]
        rec["logprob"] = o.logprobs[0][o.token_ids[0]].logprob
    end = status()
    rec["process_peak"] = max(rec["hwm_before"], end["VmHWM"], sampler.run_peak["VmRSS"])
    rec["run_peak"] = sampler.run_peak
    out.write_text(json.dumps(rec))


# ---------------------------------------------------------------- parent
def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).glob("*.safetensors"))


def warm(path: Path) -> None:   # the page cache: each way starts warm
    for p in sorted(Path(path).glob("*.safetensors")):
        with open(p, "rb", buffering=0) as f:
            while f.read(16 * MiB):
                pass


def last_error(log: Path) -> str:
    lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    errs = [ln for ln in lines if re.match(r"(\[rank\d+\]:\s*)?[\w.]*(Error|Exception|Interrupt)\b", ln)]
    return (errs or lines or ["(no output)"])[-1][:300]


def run_way(way: str, spec: dict, work: Path, args) -> dict:
    out, log = work / f"{way}.json", work / f"{way}.log"
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1"}
    t0 = time.perf_counter()
    try:
        with open(log, "w") as lf:
            rc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec), str(out)], env=env,
                                stdout=lf, stderr=subprocess.STDOUT, timeout=args.timeout).returncode
    except subprocess.TimeoutExpired:
        return {"way": way, "status": "failed", "reason": f"timed out after {args.timeout:.0f} s", "log": str(log)}
    if rc or not out.exists():
        return {"way": way, "status": "failed", "reason": f"rc {rc}: {last_error(log)}", "log": str(log)}
    r = json.loads(out.read_text())
    b, e, w = r["base"], r["exit"], r["win"]
    peak = e["VmHWM"] if r["hwm_reset"] else w["VmRSS"]
    return {"way": way, "status": "ok", "wall_s": time.perf_counter() - t0, "load_s": r["load_s"],
            "init_s": r["init_s"], "gen_s": r.get("gen_s"), "token": r.get("token"), "logprob": r.get("logprob"),
            "base_rss": b["VmRSS"], "base_anon": b["RssAnon"], "base_file": b["RssFile"],
            "peak_above": peak - b["VmRSS"], "peak_anon_above": w["RssAnon"] - b["RssAnon"],
            "peak_file_above": w["RssFile"] - b["RssFile"], "sampled_peak_above": w["VmRSS"] - b["VmRSS"],
            "after_above": e["VmRSS"] - b["VmRSS"], "after_anon_above": e["RssAnon"] - b["RssAnon"],
            "process_peak": r["process_peak"], "hwm_reset": r["hwm_reset"], "loadavg": os.getloadavg()[0],
            "log": str(log)}


def table(rows: list[dict], meta: dict) -> str:
    base = next((r for r in rows if r["way"] == "bf16" and r["status"] == "ok"), None)
    ratio = lambda r, k: f"{r[k] / base[k]:.2f}" if base and base[k] else "-"  # noqa: E731
    m = lambda v: f"{v / MiB:,.0f}"  # noqa: E731
    head = ["way", "load s", "x bf16", "load peak above base (MiB)", "anon / file (sampled)", "x bf16",
            "RSS after load above base", "base RSS", "process peak", "LLM() s", "1 token s", "token (logprob)",
            "load avg"]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {WAYS[r['way']]} | failed: {r['reason']} |" + " - |" * (len(head) - 2))
            continue
        tok = "-" if r["token"] is None else f"{r['token']} ({r['logprob']:.4f})"
        lines.append("| " + " | ".join([
            WAYS[r["way"]], f"{r['load_s']:.2f}", ratio(r, "load_s"), m(r["peak_above"]),
            f"{m(r['peak_anon_above'])} / {m(r['peak_file_above'])}", ratio(r, "peak_above"),
            m(r["after_above"]), m(r["base_rss"]), m(r["process_peak"]), f"{r['init_s']:.1f}",
            "-" if r["gen_s"] is None else f"{r['gen_s']:.1f}", tok, f"{r['loadavg']:.1f}"]) + " |")
    fp8, ring = meta["fp8_model_bytes"], meta["ring_bytes"]
    lines += ["", f"bf16 model {m(meta['bf16_model_bytes'])} MiB, FP8 model (the converted checkpoint) "
              f"{m(fp8)} MiB (convert: {meta['convert_s']:.1f} s), ring {m(ring)} MiB, largest tensor kept bf16 "
              f"{meta['largest_kept'][1]} {m(meta['largest_kept'][0])} MiB"]
    plug = next((r for r in rows if r["way"] == "mmapload"), None)
    if plug and plug["status"] == "ok":
        limit = fp8 + ring + SLACK
        meta["target"] = {"limit": limit, "peak_above": plug["peak_above"], "held": plug["peak_above"] <= limit}
        lines.append(f"target: plugin load peak above base {m(plug['peak_above'])} MiB <= FP8 model + ring + 200 MiB "
                     f"= {m(limit)} MiB: {'HELD' if plug['peak_above'] <= limit else 'MISSED'} "
                     f"({m(plug['peak_above'] - fp8)} MiB above the FP8 model)")
    return "\n".join(lines)


def main(argv=None) -> int:
    from mmapload.cli import parse_size
    from mmapload.config import RING_BYTES
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", type=Path, help="a local bf16 checkpoint folder (default: generate one)")
    p.add_argument("--gib", type=float, default=1.5, help="size of the generated checkpoint, GiB (1.5)")
    p.add_argument("--ways", default=",".join(WAYS), help=f"comma list of {', '.join(WAYS)}")
    p.add_argument("--ring-bytes", type=parse_size, default=RING_BYTES, help="the plugin's ring (256MiB)")
    p.add_argument("--max-model-len", type=int, default=64)
    p.add_argument("--no-generate", action="store_true", help="skip the 1-token generation")
    p.add_argument("--timeout", type=float, default=1200.0, help="seconds per way (1200)")
    p.add_argument("--workdir", type=Path, help="where the checkpoints and logs go (default: a temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the generated / converted checkpoints and logs")
    p.add_argument("--json", type=Path, help="write everything as JSON")
    args = p.parse_args(argv)
    ways = [w.strip() for w in args.ways.split(",") if w.strip()]
    if not ways or set(ways) - set(WAYS):
        p.error(f"--ways: pick from {', '.join(WAYS)}, got {args.ways!r}")
    import mmapload
    from mmapload.checkpoint import open_checkpoint
    from mmapload.synth import make_llama_checkpoint
    work = Path(tempfile.mkdtemp(prefix="bench_vllm-", dir=args.workdir))
    meta = {"command": " ".join(["python", "tools/bench_vllm.py", *(sys.argv[1:] if argv is None else argv)]),
            "date": time.strftime("%Y-%m-%d %H:%M:%S %z"), "loadavg_start": list(os.getloadavg()),
            "ring_bytes": args.ring_bytes, "cores": os.cpu_count(), "workdir": str(work)}
    rows: list[dict] = []
    try:
        src = args.model or make_llama_checkpoint(work / "bf16", int(args.gib * 2**30))
        t0 = time.perf_counter()
        dst = mmapload.convert(src, work / "fp8-channel", granularity="channel")
        meta.update(model=str(src), convert_s=time.perf_counter() - t0, bf16_model_bytes=folder_bytes(src),
                    fp8_model_bytes=folder_bytes(dst), largest_kept=max(
                        (t.end - t.start, t.name) for t in open_checkpoint(dst).tensors if not t.dtype.startswith("F8")))
        common = {"max_model_len": args.max_model_len, "generate": not args.no_generate}
        specs = {"bf16": {"model": str(src)}, "online_fp8": {"model": str(src), "quantization": "fp8_per_channel"},
                 "mmapload": {"model": str(src), "load_format": "mmapload",
                              "model_loader_extra_config": {"ring_bytes": args.ring_bytes}},
                 "converted": {"model": str(dst)}}
        for way in ways:
            warm(Path(specs[way]["model"]))
            print(f"# {way} ...", file=sys.stderr, flush=True)
            rows.append(r := run_way(way, {**specs[way], **common}, work, args))
            print(f"# {way}: " + (f"load {r['load_s']:.1f} s, peak above base {r['peak_above'] / MiB:,.0f} MiB"
                                  if r["status"] == "ok" else r["reason"]), file=sys.stderr, flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    meta["loadavg_end"] = list(os.getloadavg())
    text = table(rows, meta)
    la = lambda v: " ".join(f"{x:.2f}" for x in v)  # noqa: E731
    print(f"{meta['date']}, {meta['cores']} cores, load average {la(meta['loadavg_start'])} at start, "
          f"{la(meta['loadavg_end'])} at end\ncommand: {meta['command']}\nmodel: {meta['model']}\n\n"
          "peaks above the vLLM runtime's baseline (VmRSS when load_model starts); ratios x bf16 = this / the "
          "bf16 default loader's (< 1 is better); process peak = VmHWM of the whole child (KV cache included); "
          "LLM() s = the constructor (vllm already imported); load avg = 1-min load average as the way ended "
          "(the seconds are only comparable on a quiet machine)\n")
    print(text)
    if args.json:
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    return 1 if any(r["status"] != "ok" for r in rows) else 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:   # before importing mmapload: the child's baseline is vLLM's alone
        sys.exit(child(json.loads(sys.argv[2]), Path(sys.argv[3])))
    sys.exit(main())
