#!/usr/bin/env python
"""Benchmark mmapload.fp8 quantization against the naive formula.

For each shape, granularity and fp8 dtype, times what the streaming loader does per
tensor (``amax_2d`` + ``scale_from_amax`` + ``Quantizer.quantize_2d_into``) and a naive
full-tensor version (``(w.float() / scale).clamp(-max, max).to(fp8)`` with abs/amax
scales) in the same run, checks both give identical bytes, and prints a markdown table
of GB/s of source (e.g. bf16) input. Best of --repeat runs after one warm-up.

    python tools/bench_quantize.py --threads 2 --shape 4096x4096 --dtype bf16 --repeat 3
"""

from __future__ import annotations

import argparse
import time

import torch

from mmapload import fp8 as F
from mmapload._math import ceil_div
from mmapload.dtypes import DTYPES, FP8, WIDE_FLOATS

# from the one dtype table: source floats by safetensors name (bf16, f16, f32, f64), FP8 as e4m3 / e5m2
SOURCES = {n.lower(): DTYPES[n] for n in WIDE_FLOATS}
FP8_BY_NAME = {n.removeprefix("F8_").lower(): DTYPES[n] for n in FP8}
DEFAULT_SHAPES = ["4096x4096", "4096x11008", "1000x3000"]


def parse_shape(text: str) -> tuple[int, int]:
    try:
        rows, cols = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape must look like 4096x11008, got {text!r}") from None
    return rows, cols


def naive_quantize(w, g, dt, bs):
    """The obvious vectorised formula with full-size temporaries."""
    m = F.fp8_max(dt)
    x = w.float()
    rows, cols = x.shape
    if g == "tensor":
        amax = x.abs().amax()
        full = None
    elif g == "channel":
        amax = x.abs().amax(-1, keepdim=True)
        full = None
    else:
        br, bc = bs
        nbr, nbc = ceil_div(rows, br), ceil_div(cols, bc)
        padded = torch.nn.functional.pad(x.abs(), (0, nbc * bc - cols, 0, nbr * br - rows))
        amax = padded.view(nbr, br, nbc, bc).amax(dim=(1, 3))
    scale = torch.where(amax == 0, torch.ones_like(amax), (amax / m).clamp(min=torch.finfo(torch.float32).tiny))
    if g == "block":
        full = scale.repeat_interleave(br, 0)[:rows].repeat_interleave(bc, 1)[:, :cols]
    q = (x / (scale if full is None else full)).clamp(-m, m).to(dt)
    return q, scale


def mmapload_quantize(quantizer, w, g, dt, bs, out):
    scale = F.scale_from_amax(F.amax_2d(w, g, bs), dt)
    quantizer.quantize_2d_into(w, scale, out)
    return out, scale


def best_seconds(fn, repeat, sync):
    fn()  # warm-up
    sync()
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t0)
    return best


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    ap.add_argument("--shape", type=parse_shape, action="append",
                    help=f"ROWSxCOLS, repeatable (default {' '.join(DEFAULT_SHAPES)})")
    ap.add_argument("--dtype", choices=sorted(SOURCES), default="bf16",
                    help="source dtype, as safetensors names it (default bf16)")
    ap.add_argument("--repeat", type=int, default=3, help="timed runs per case, best kept (default 3)")
    ap.add_argument("--granularity", choices=[g.value for g in F.Granularity], action="append",
                    help="repeatable (default all)")
    ap.add_argument("--fp8", choices=sorted(FP8_BY_NAME), action="append", help="repeatable (default both)")
    ap.add_argument("--block", type=parse_shape, default=(128, 128), help="block size (default 128x128)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    ap.add_argument("--no-naive", action="store_true", help="skip the naive baseline")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    shapes = args.shape or [parse_shape(s) for s in DEFAULT_SHAPES]
    grans = args.granularity or [g.value for g in F.Granularity]
    fp8s = args.fp8 or sorted(FP8_BY_NAME)
    src = SOURCES[args.dtype]

    print(f"torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}, "
          f"source {args.dtype}, block {args.block[0]}x{args.block[1]}, best of {args.repeat}\n")
    print("| shape | granularity | fp8 | mmapload GB/s | naive GB/s | speed-up | identical |")
    print("|---|---|---|---:|---:|---:|---|")
    gen = torch.Generator().manual_seed(0)
    for rows, cols in shapes:
        w = torch.randn(rows, cols, generator=gen).to(src).to(device)
        gb = w.numel() * w.element_size() / 1e9
        for g in grans:
            for name in fp8s:
                dt = FP8_BY_NAME[name]
                quantizer = F.Quantizer(dt, g, args.block, device=device)
                out = torch.empty(w.shape, dtype=dt, device=device)
                t_ours = best_seconds(lambda: mmapload_quantize(quantizer, w, g, dt, args.block, out),
                                      args.repeat, sync)
                ours = gb / t_ours
                if args.no_naive:
                    naive_s, ratio, same = "-", "-", "-"
                else:
                    t_naive = best_seconds(lambda: naive_quantize(w, g, dt, args.block), args.repeat, sync)
                    qn, sn = naive_quantize(w, g, dt, args.block)
                    q, s = mmapload_quantize(quantizer, w, g, dt, args.block, out)
                    same = "yes" if torch.equal(q.view(torch.uint8), qn.view(torch.uint8)) and \
                        torch.equal(s.reshape(sn.shape), sn) else "NO"
                    naive_s, ratio = f"{gb / t_naive:.2f}", f"{t_naive / t_ours:.1f}x"
                print(f"| {rows}x{cols} | {g} | {name} | {ours:.2f} | {naive_s} | {ratio} | {same} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
