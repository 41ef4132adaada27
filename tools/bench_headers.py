#!/usr/bin/env python
"""Parsing cost of a huge but valid header: mmapload against safetensors.safe_open, same run.

Writes one shard whose header holds ``--tensors`` zero-size tensors (``"t<i>": F32 [0] at
[0, 0]``, ~60 bytes each: 1.7 million make the 100 MB header cap), then runs each target in a
fresh process and prints its wall seconds and peak RSS (``ru_maxrss``), and the peak above the
process's RSS after its imports:

* ``safe_open``: ``safetensors.safe_open(path, "pt")`` and its ``keys()`` (the parse alone);
* ``load_file``: ``safetensors.torch.load_file``, every tensor built (what ``stream_quantize`` returns);
* ``open_checkpoint``: mmapload's header parse and validation alone;
* ``stream_quantize`` (``io="mmap"``), ``inspect`` (``mmapload.estimate.estimate``), ``convert``.

    python tools/bench_headers.py --tensors 100000 --targets safe_open,stream_quantize
"""

from __future__ import annotations

import argparse
import json
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

TARGETS = {
    "safe_open": "from safetensors import safe_open\nwith safe_open(P, 'pt') as f: n = len(f.keys())",
    "load_file": "from safetensors.torch import load_file\nn = len(load_file(P))",
    "open_checkpoint": "from mmapload.checkpoint import open_checkpoint\nn = len(open_checkpoint(P).tensors)",
    "stream_quantize": "from mmapload import stream_quantize\nn = len(stream_quantize(P, 'cpu', policy='names'))",
    "inspect": "from mmapload.estimate import estimate\nn = estimate(P, 'cpu', policy='names').tensors",
    "convert": "from mmapload import convert\nimport os\n"
               "n = len(os.listdir(convert(P, OUT, policy='names')))",
}
CHILD = """
import resource, sys, time
from mmapload._procmem import read_mem
import torch, safetensors, mmapload
P, OUT = sys.argv[1], sys.argv[2]
base = read_mem().rss
t0 = time.perf_counter()
{body}
dt = time.perf_counter() - t0
print(dt, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, base, n)
"""


def write_header(path: Path, n: int) -> int:
    entry = '"t%d":{"dtype":"F32","shape":[0],"data_offsets":[0,0]}'
    raw = ("{" + ",".join(entry % i for i in range(n)) + "}").encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
    return len(raw)


def run(target: str, path: Path, out: Path, timeout: float) -> dict:
    code = CHILD.format(body=TARGETS[target])
    res = subprocess.run([sys.executable, "-c", code, str(path), str(out)], capture_output=True, text=True,
                         timeout=timeout)
    if res.returncode:
        return {"target": target, "error": res.stderr.strip().splitlines()[-1:]}
    dt, peak, base, n = res.stdout.split()
    return {"target": target, "seconds": float(dt), "peak_rss": int(peak), "base_rss": int(base), "n": n}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tensors", type=int, default=100_000)
    ap.add_argument("--targets", default=",".join(TARGETS), help=f"comma-separated from {','.join(TARGETS)}")
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-headers-") as tmp:
        path = Path(tmp) / "model.safetensors"
        size = write_header(path, a.tensors)
        rows = []
        for t in a.targets.split(","):
            rows.append(run(t, path, Path(tmp) / f"out-{t}", a.timeout))
    if a.json:
        print(json.dumps({"tensors": a.tensors, "header_bytes": size, "results": rows}, indent=2))
        return
    print(f"{a.tensors:,} zero-size tensors, header {size / 1e6:.1f} MB\n")
    print("| target | seconds | peak RSS MiB | peak - after imports MiB |\n|---|---:|---:|---:|")
    for r in rows:
        if "error" in r:
            print(f"| {r['target']} | error: {r['error']} | | |")
        else:
            print(f"| {r['target']} | {r['seconds']:.2f} | {r['peak_rss'] / 2**20:,.0f} | "
                  f"{(r['peak_rss'] - r['base_rss']) / 2**20:,.0f} |")


if __name__ == "__main__":
    main()
