"""Tensor-parallel loads measured rank by rank: ``run_world(cfg, world)`` starts ``world`` fresh
interpreters on 127.0.0.1 (one gloo process group, a free port, a deadline), each loading its
rank's part of the checkpoint, and returns what each measured of itself.

Strategies (``cfg["strategy"]``), the same slices and the same FP8 quantizer in both:
- ``safe_open``: what engines do: every rank opens every shard with ``safetensors.safe_open``,
  ``get_tensor`` each tensor, narrows it to its slice (``tp_layout.rank_slices``: tp.py's cut,
  heads from config.json, as mmapload plans it), copies it (the engine's parameter) and
  quantizes it (``fp8.quantize``). Its per-tensor scales are computed on the slice, so they
  depend on the TP size (as vLLM's online FP8 does); mmapload MAX-reduces amaxes over the ranks;
- ``mmapload``: ``stream_quantize(..., tp_size=world)`` with ``cfg["io"]``.

Per rank: seconds (from a barrier after the imports), CPU seconds, the bytes the loader read
(mmapload: ``report.bytes_read``; safe_open: the bytes of every tensor ``get_tensor`` handed
over), the bytes the kernel read from storage for it (``/proc/self/io`` read_bytes: the page
cache is shared, so a page another rank brought in is free), major faults, peak RSS above the
post-import baseline (``VmHWM`` after ``clear_refs``; anon / file-backed peaks sampled) and the
bytes kept. Linux only (``/proc``).
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time

import torch

from .loaders import StrategyError

__all__ = ["TP_STRATEGIES", "run_world", "free_port"]

TP_STRATEGIES = ("safe_open", "mmapload")
_CHILD = "import sys; from mmapload.bench.tp import _child; sys.exit(_child(sys.stdin.read()))"
_RESULT = "@mmapload-tp-result "


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_world(cfg: dict, world: int, timeout: float) -> list[dict]:
    """``cfg`` (tools/bench.py's child config plus ``tp_timeout``) on ``world`` fresh ranks;
    each rank's measurements, by rank. StrategyError naming the first failed rank (its error,
    signal or exit) when any fails or the world runs past ``timeout`` seconds (all killed)."""
    port = free_port()
    procs, outs = [], []
    try:
        for rank in range(world):
            out = tempfile.TemporaryFile(mode="w+")
            outs.append(out)
            p = subprocess.Popen([sys.executable, "-c", _CHILD], stdin=subprocess.PIPE, stdout=out, text=True)
            p.stdin.write(json.dumps({**cfg, "rank": rank, "world": world, "port": port}))
            p.stdin.close()
            procs.append(p)
        deadline = time.monotonic() + timeout
        for p in procs:
            try:
                p.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                break
        late = [r for r, p in enumerate(procs) if p.poll() is None]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    results, errors = [], []
    for rank, (p, out) in enumerate(zip(procs, outs)):
        out.seek(0)
        line = next((l for l in reversed(out.read().splitlines()) if l.startswith(_RESULT)), None)
        out.close()
        res = json.loads(line[len(_RESULT):]) if line else None
        if rank in late:
            errors.append(f"rank {rank} timed out after {timeout:g} s")
        elif res is not None and "error" in res:
            errors.append(f"rank {rank}: {res['error']}")
        elif res is None or p.returncode:
            why = f"killed by signal {-p.returncode}" if p.returncode < 0 else f"exit {p.returncode}"
            errors.append(f"rank {rank}: {why} without a result (see its stderr)")
        results.append(res)
    if errors:   # a rank's own error first: the others only saw their collectives fail
        errors.sort(key=lambda e: any(w in e for w in ("timed out", "another rank", "without a result")))
        raise StrategyError(cfg["strategy"], "; ".join(errors)[:600])
    return results


# -- inside each rank ---------------------------------------------------------------------------
def _proc(path: str) -> dict[str, int]:
    vals = {}
    with open(path) as f:
        for line in f:
            key, _, rest = line.partition(":")
            if rest.split() and rest.split()[0].isdigit():
                vals[key] = int(rest.split()[0]) * (1024 if rest.strip().endswith("kB") else 1)
    return vals


def _cpu() -> tuple[float, int]:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime, ru.ru_majflt


def _signature(items) -> str:
    """The kept tensors' names and shapes (not values: the safe_open baseline's scales differ)."""
    h = hashlib.blake2b(digest_size=8)
    for name, shape in sorted(items):
        h.update(f"{name}:{list(shape)};".encode())
    return h.hexdigest()


def _by_mmapload(ckpt, opts, rank, world):
    from ..stream import stream_quantize
    model = stream_quantize(ckpt.root, "cpu", **opts.as_kwargs())
    r = model.report
    if r.tp_size != world or r.tp_rank != rank:
        raise RuntimeError(f"report says rank {r.tp_rank} of {r.tp_size}, expected {rank} of {world}")
    sig = _signature((n, tuple(model[n].shape)) for n in model)
    return model, {"bytes_read": r.bytes_read, "retained_bytes": model.nbytes, "signature": sig,
                   "tensors": len(model), "collectives": r.collectives,
                   "collective_seconds": r.stage_seconds.get("collectives"),
                   "report_peak_rss_above": r.peak_rss - r.rss_before}


def _by_safe_open(ckpt, opts, rank, world):
    from safetensors import safe_open
    from ..fp8 import quantize
    from ..decide import policy_for
    from ..tp_layout import heads_of, rank_slices
    from ..tp_ranges import take
    from .sampler import mark
    policy = policy_for(ckpt, opts)
    slices = rank_slices(ckpt.tensors, policy, opts.scheme, rank, world, plan=opts.tp_plan,
                         heads=heads_of(getattr(policy, "config", None)))
    keep, handed, retained = {}, 0, 0
    mark("read")
    for shard in ckpt.shards:
        with safe_open(str(shard.path), "pt", device="cpu") as f:
            for name in f.keys():
                t = f.get_tensor(name)              # every byte of the tensor, handed over
                handed += t.numel() * t.element_size()
                sl = slices.get(name)
                part = take(t, sl) if sl is not None else t.clone()   # the rank's own copy
                del t
                if policy(ckpt[name]):
                    mark("quantize")
                    part = quantize(part, opts.granularity, opts.fp8_dtype, opts.block_size, name=name)
                keep[name] = part
                retained += sum(x.numel() * x.element_size() for x in (part if isinstance(part, tuple) else (part,)))
    sig = _signature((n, tuple((v[0] if isinstance(v, tuple) else v).shape)) for n, v in keep.items())
    return keep, {"bytes_read": handed, "retained_bytes": retained, "signature": sig, "tensors": len(keep),
                  "collectives": 0, "collective_seconds": None}


RUNNERS = {"mmapload": _by_mmapload, "safe_open": _by_safe_open}


def _child(text: str) -> int:
    cfg = json.loads(text)
    rank, world = cfg["rank"], cfg["world"]
    try:
        return _measure(cfg, rank, world)
    except Exception as e:  # noqa: BLE001 - reported to the parent, traceback on stderr
        import traceback
        traceback.print_exc()
        print(_RESULT + json.dumps({"error": f"{type(e).__name__}: {str(e)[:400]}"}), flush=True)
        return 1


def _measure(cfg: dict, rank: int, world: int) -> int:
    import datetime
    import torch.distributed as dist
    import safetensors.torch  # noqa: F401 - every strategy's imports come before the baseline
    from .._procmem import read_mem
    from ..checkpoint import open_checkpoint
    from ..config import LoadOptions
    from ..stream import stream_quantize  # noqa: F401
    from .sampler import MemorySampler, mark
    if cfg.get("policy", "auto") != "names":
        try:
            import transformers  # noqa: F401 - the policy's skeleton is built in this process
        except ImportError:
            pass
    torch.set_num_threads(cfg["threads"])
    timeout = datetime.timedelta(seconds=cfg["tp_timeout"])
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{cfg['port']}", rank=rank,
                            world_size=world, timeout=timeout)
    ckpt = open_checkpoint(cfg["checkpoint"])
    opts = LoadOptions(ring_bytes=cfg["ring_bytes"], granularity=cfg["granularity"], fp8_dtype=cfg["fp8"],
                       io=cfg["io"], read_threads=cfg.get("read_threads"), policy=cfg.get("policy", "auto"),
                       tp_size=world, tp_timeout=cfg["tp_timeout"])
    from ..decide import policy_for
    policy_for(ckpt, opts)          # the model skeleton of config.json, memoized: not a load's work
    gc.collect()
    base = read_mem()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")            # VmHWM := VmRSS: the peak from here on
        hwm_reset = True
    except OSError:
        hwm_reset = False
    dist.barrier()                  # every rank starts together, as in an engine
    io0, (cpu0, flt0) = _proc("/proc/self/io"), _cpu()
    with MemorySampler(cfg["interval"]) as s:
        mark("open")
        t0 = time.perf_counter()
        kept, info = RUNNERS[cfg["strategy"]](ckpt, opts, rank, world)
        seconds = time.perf_counter() - t0
        mark("done")
    io1, (cpu1, flt1), status = _proc("/proc/self/io"), _cpu(), _proc("/proc/self/status")
    peaks = s.peaks()
    hwm = status.get("VmHWM") if hwm_reset else max(base.rss, peaks["rss"])
    print(_RESULT + json.dumps({
        **info, "rank": rank, "world": world, "seconds": seconds, "cpu_seconds": cpu1 - cpu0,
        "threads": torch.get_num_threads(), "major_faults": flt1 - flt0,
        "storage_read": io1["read_bytes"] - io0["read_bytes"], "rchar": io1["rchar"] - io0["rchar"],
        "baseline_rss": base.rss, "peak_rss_above": hwm - base.rss, "vmhwm": hwm_reset,
        "peak_anon_above": None if base.anon is None or peaks["anon"] is None else peaks["anon"] - base.anon,
        "peak_file_above": None if base.file is None or peaks["file"] is None else peaks["file"] - base.file,
    }), flush=True)
    del kept
    sys.stdout.flush()
    os._exit(0)     # no destroy_process_group: a peer may be gone; the parent judges by the line
