"""``python -m mmapload`` / ``mmapload``: the only place that parses a command line."""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
import time
from pathlib import Path

import torch

from .errors import MmapLoadError

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "kib": 2**10, "m": 10**6, "mb": 10**6,
          "mib": 2**20, "g": 10**9, "gb": 10**9, "gib": 2**30, "t": 10**12, "tb": 10**12, "tib": 2**40}
_FP8 = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}


def parse_size(text: str) -> int:
    """'256MiB', '1.5GiB', '700M', '4096' -> bytes (K/M/G are powers of 10, KiB/MiB/GiB of 2)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (examples: 64MiB, 1.5GiB, 700M)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def _add_load_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N (default cpu)")
    p.add_argument("--ring-bytes", type=parse_size, default=256 << 20, help="ring buffer size (256MiB)")
    p.add_argument("--granularity", default="tensor", choices=["tensor", "channel", "block"])
    p.add_argument("--fp8", default="e4m3", choices=sorted(_FP8), help="FP8 format (e4m3)")
    p.add_argument("--skip", action="append", default=[], help="name pattern kept unquantized")
    p.add_argument("--progress", action="store_true", help="show a progress line on stderr")


def _load_kwargs(a: argparse.Namespace) -> dict:
    return dict(ring_bytes=a.ring_bytes, granularity=a.granularity, fp8_dtype=_FP8[a.fp8],
                skip=tuple(a.skip), progress=a.progress)


def _quantize(path, a: argparse.Namespace) -> int:
    from .stream import stream_quantize
    model = stream_quantize(path, a.device, **_load_kwargs(a))
    print(model.report.format())
    return 0


def _demo(a: argparse.Namespace) -> int:
    from .synth import make_llama_checkpoint
    with tempfile.TemporaryDirectory(prefix="mmapload-demo-") as tmp:
        where = Path(a.keep) if a.keep else Path(tmp)
        print(f"generating a llama-shaped bf16 checkpoint of about {a.size / 2**30:.2f} GiB in {where} ...",
              flush=True)
        t0 = time.perf_counter()
        ckpt = make_llama_checkpoint(where, a.size, shards=2)
        size = sum(p.stat().st_size for p in ckpt.glob("*.safetensors"))
        print(f"generated {size / 2**30:.2f} GiB ({size:,} bytes) in {time.perf_counter() - t0:.1f} s; "
              f"streaming it to {a.device} as FP8 ...\n", flush=True)
        return _quantize(ckpt, a)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mmapload", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="generate a checkpoint, stream it, print the memory report")
    p.add_argument("--size", type=parse_size, default=1 << 30, help="checkpoint size (1GiB)")
    p.add_argument("--keep", metavar="DIR", help="write the checkpoint to DIR and keep it")
    _add_load_options(p)
    p = sub.add_parser("quantize", help="stream_quantize a checkpoint and print the report")
    p.add_argument("checkpoint")
    _add_load_options(p)
    a = parser.parse_args(argv)
    try:
        if a.command == "demo":
            return _demo(a)
        return _quantize(a.checkpoint, a)
    except (MmapLoadError, FileNotFoundError) as e:
        print(f"mmapload: error: {e}", file=sys.stderr)
        return 2
