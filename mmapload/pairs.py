"""Checkpoints that are already FP8: pair each FP8 weight with its scale, re-quantize nothing.

An FP8 tensor ``X`` (rank >= 2) with a float32 companion ``X_scale`` (mmapload,
compressed-tensors, vLLM per-tensor "fp8") or ``X_scale_inv`` (DeepSeek / vLLM block "fp8";
despite the name, dequantize is ``q * s``) comes out of the stream as one
``QuantizedTensor``. The granularity follows from the scale's shape. The weight and its
scale may sit anywhere in file order, even in different shards: whichever arrives first
waits (it is retained anyway) until the other one does.
"""

from __future__ import annotations

import json
from typing import Iterator

import torch

from .assemble import Loaded
from .checkpoint import DTYPES, Checkpoint, TensorSpec
from .errors import HeaderError
from .fp8 import FP8_DTYPES, Granularity
from .result import QuantizedTensor

__all__ = ["fp8_pairs", "paired"]

_FP8 = frozenset(n for n, d in DTYPES.items() if d in FP8_DTYPES)   # the FP8 we write: no FNUZ / E8M0
SUFFIXES = ("_scale", "_scale_inv")


def _hint(metadata: dict) -> tuple[Granularity | None, tuple[int, int]]:
    """What our own writer recorded in the shard header (convert's "mmapload" metadata)."""
    try:
        meta = json.loads(metadata.get("mmapload", "{}"))
        return Granularity(meta["granularity"]), tuple(meta.get("block_size", (128, 128)))
    except (ValueError, KeyError, TypeError):
        return None, (128, 128)


def _granularity(w: TensorSpec, s: TensorSpec, hint) -> tuple[Granularity, tuple[int, int]]:
    lead, (rows, cols) = w.shape[:-2], w.shape[-2:]
    grid = s.shape[len(lead):] if s.shape[:len(lead)] == lead else None
    if grid == (1, 1) and hint[0] is Granularity.BLOCK and rows <= hint[1][0] and cols <= hint[1][1]:
        return hint   # one block covering the matrix: the writer said block
    if s.shape in ((), (1,)) and not lead or grid == (1, 1) and (lead or rows > 1):
        return Granularity.TENSOR, (128, 128)
    if grid == (rows, 1):
        return Granularity.CHANNEL, (128, 128)
    if grid is not None and len(grid) == 2 and all(grid):
        for br, bc in ((128, 128), (-(-rows // grid[0]), -(-cols // grid[1]))):
            if (-(-rows // br), -(-cols // bc)) == grid:
                return Granularity.BLOCK, (br, bc)
    raise HeaderError(
        f"{s.shard}: scale {s.name!r} has shape {list(s.shape)}, which fits no FP8 granularity of "
        f"{w.name!r} {list(w.shape)} (tensor: [] or lead+[1,1]; channel: lead+[{rows},1]; block: "
        f"lead+[ceil(rows/br), ceil(cols/bc)])")


def fp8_pairs(ckpt: Checkpoint) -> dict[str, tuple[str, Granularity, tuple[int, int]]]:
    """weight name -> (scale name, granularity, block size) for every FP8 weight with a scale."""
    out = {}
    hints = {sh.path: _hint(sh.metadata) for sh in ckpt.shards}
    for w in ckpt.tensors:
        if w.dtype not in _FP8 or len(w.shape) < 2:
            continue
        for suffix in SUFFIXES:
            s = ckpt.get(w.name + suffix)
            if s is not None and s.dtype == "F32":
                out[w.name] = (s.name, *_granularity(w, s, hints[w.shard]))
                break
    return out


def paired(items: Iterator[tuple[str, Loaded]], pairs: dict) -> Iterator[tuple[str, Loaded]]:
    """Join FP8 weights with their scales as ``QuantizedTensor``; everything else passes."""
    if not pairs:
        yield from items
        return
    scale_of = {s: w for w, (s, _, _) in pairs.items()}
    waiting: dict[str, torch.Tensor] = {}
    for name, t in items:
        weight = name if name in pairs else scale_of.get(name)
        if weight is None:
            yield name, t
            continue
        other = pairs[weight][0] if name == weight else weight
        if other not in waiting:
            waiting[name] = t
            continue
        data, scale = (t, waiting.pop(other)) if name == weight else (waiting.pop(other), t)
        _, gran, block = pairs[weight]
        if gran is Granularity.TENSOR and data.dim() == 2:
            scale = scale.reshape(())   # [1] (some writers) and [] mean the same
        yield weight, QuantizedTensor(data, scale, torch.bfloat16, gran, block)
    if waiting:   # only reachable if the stream was cut short by the caller's own filter
        raise HeaderError(f"FP8 weights / scales without their partner: {sorted(waiting)}")
