"""Run one loader in this (fresh) process and print its memory numbers as JSON.

    python tests/memprobe.py mmapload|naive CKPT RING_BYTES [GRANULARITY [IO]]

Peak RSS comes from the kernel (VmHWM: ru_maxrss would start at the parent's peak, since a
forked child inherits it) and a 2 ms sampler thread that also tracks the
anonymous / file-backed split from /proc/self/status.
"""

import json
import sys
import threading
import time
from pathlib import Path

import torch

from mmapload._procmem import read_mem

torch.set_num_threads(2)


class Sampler(threading.Thread):
    def __init__(self):
        super().__init__(daemon=True)
        self.stop, self.peak = threading.Event(), {"rss": 0, "anon": 0, "file": 0}

    def run(self):
        while not self.stop.is_set():
            m = read_mem()
            for k in self.peak:
                self.peak[k] = max(self.peak[k], getattr(m, k) or 0)
            time.sleep(0.002)


def naive(ckpt: Path):
    """vLLM's old online path: load_file each shard, then quantize every weight."""
    from safetensors.torch import load_file
    from mmapload.fp8 import quantize
    from mmapload.config import LoadOptions
    from mmapload.checkpoint import open_checkpoint
    from mmapload.decide import policy_for
    c = open_checkpoint(ckpt)
    specs, policy = {s.name: s for s in c.tensors}, policy_for(c, LoadOptions())
    keep, loaded = {}, []
    for shard in sorted(ckpt.glob("*.safetensors")):
        loaded.append(load_file(shard))
    for sd in loaded:
        for name, t in sd.items():
            keep[name] = quantize(t) if policy(specs[name]) else t
    return sum(sum(x.numel() * x.element_size() for x in v) if isinstance(v, tuple)
               else v.numel() * v.element_size() for v in keep.values()), keep


def _vm_hwm() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def main():
    which, ckpt, ring = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
    granularity = sys.argv[4] if len(sys.argv) > 4 else "tensor"
    io = sys.argv[5] if len(sys.argv) > 5 else "mmap"
    import mmapload  # the baseline is taken after every import either loader needs
    import mmapload.fp8, safetensors.torch  # noqa: F401,E401
    base = read_mem()
    s = Sampler()
    s.start()
    t0 = time.perf_counter()
    if which == "mmapload":
        model = mmapload.stream_quantize(ckpt, "cpu", ring_bytes=ring, granularity=granularity, io=io)
        retained = model.nbytes
    else:
        retained, model = naive(ckpt)
    seconds = time.perf_counter() - t0
    time.sleep(0.01)
    s.stop.set()
    s.join()
    maxrss = _vm_hwm()
    print(json.dumps({"base_rss": base.rss, "base_file": base.file, "base_anon": base.anon,
                      "peak_rss": max(maxrss, s.peak["rss"]), "peak_anon": s.peak["anon"],
                      "peak_file": s.peak["file"], "retained": retained, "seconds": seconds}))


if __name__ == "__main__":
    main()
