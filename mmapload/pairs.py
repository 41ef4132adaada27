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

__all__ = ["fp8_pairs", "paired", "unscaled_fp8"]

_FP8 = frozenset(n for n, d in DTYPES.items() if d in FP8_DTYPES)   # the FP8 we write: no FNUZ / E8M0
SUFFIXES = ("_scale", "_scale_inv")


def _declared(config: dict | None, metadata: dict) -> tuple[Granularity | None, tuple[int, int] | None, str]:
    """What the checkpoint says about its FP8 weights: (granularity or None, block size or None,
    where it says so). config.json first (vLLM / DeepSeek ``weight_block_size``; compressed-tensors
    ``strategy`` and ``block_structure``), then what our writer recorded in the shard header."""
    q = (config or {}).get("quantization_config")
    if isinstance(q, dict) and q.get("quant_method") == "fp8":
        bs = q.get("weight_block_size")
        return (Granularity.BLOCK, tuple(bs), "config.json weight_block_size") if bs else \
            (Granularity.TENSOR, None, "config.json (fp8 without weight_block_size)")
    if isinstance(q, dict) and q.get("quant_method") == "compressed-tensors":
        for group in (q.get("config_groups") or {}).values():
            w = (group or {}).get("weights") or {}
            g = w.get("strategy")
            if g in ("tensor", "channel", "block"):
                bs = w.get("block_structure")
                return Granularity(g), tuple(bs) if bs else None, "config.json config_groups strategy"
    try:
        meta = json.loads(metadata.get("mmapload", "{}"))
        return Granularity(meta["granularity"]), tuple(meta.get("block_size", (128, 128))), \
            "the shard's mmapload metadata"
    except (ValueError, KeyError, TypeError):
        return None, None, ""


def _granularity(w: TensorSpec, s: TensorSpec, declared, block_size) -> tuple[Granularity, tuple[int, int]]:
    """The granularity and block size of ``w``'s scale ``s``: what the checkpoint declares, or
    from the shape with the caller's ``block_size``; the shape always cross-checks."""
    lead, (rows, cols) = w.shape[:-2], w.shape[-2:]
    grid = s.shape[len(lead):] if s.shape[:len(lead)] == lead else None
    gran, bs, where = declared
    if gran is Granularity.BLOCK and bs is not None and len(bs) == 2 and all(
            isinstance(b, int) and b > 0 for b in bs):
        want = (-(-rows // bs[0]), -(-cols // bs[1]))
        if grid == want:
            return Granularity.BLOCK, tuple(bs)
        raise HeaderError(
            f"{s.shard}: scale {s.name!r} has shape {list(s.shape)}, but {where} says {bs[0]}x{bs[1]} "
            f"blocks, which give {list(lead + want)} for {w.name!r} {list(w.shape)}; the checkpoint's "
            "config and tensors disagree: fix weight_block_size / block_structure in config.json")
    if (s.shape in ((), (1,)) and not lead) or (grid == (1, 1) and (lead or rows > 1)):
        return Granularity.TENSOR, tuple(block_size)
    if grid == (rows, 1):
        return Granularity.CHANNEL, tuple(block_size)
    br, bc = block_size
    if grid == (-(-rows // br), -(-cols // bc)):
        return Granularity.BLOCK, tuple(block_size)
    raise HeaderError(
        f"{s.shard}: scale {s.name!r} has shape {list(s.shape)}, which fits no FP8 granularity of "
        f"{w.name!r} {list(w.shape)} with block_size {tuple(block_size)} (tensor: [] or lead+[1,1]; "
        f"channel: lead+[{rows},1]; block: lead+[ceil(rows/br), ceil(cols/bc)]); if the checkpoint "
        "was quantized with other blocks, pass block_size=(br, bc) or declare weight_block_size in "
        "config.json")


def fp8_pairs(ckpt: Checkpoint, config: dict | None = None, block_size=(128, 128)
              ) -> dict[str, tuple[str, Granularity, tuple[int, int]]]:
    """weight name -> (scale name, granularity, block size) for every FP8 weight with a scale.
    ``config``: the checkpoint's config.json (its quantization_config declares the block size);
    ``block_size``: the caller's, for a checkpoint that declares none."""
    out = {}
    declared = {sh.path: _declared(config, sh.metadata) for sh in ckpt.shards}
    for w in ckpt.tensors:
        if w.dtype not in _FP8 or len(w.shape) < 2:
            continue
        for suffix in SUFFIXES:
            s = ckpt.get(w.name + suffix)
            if s is not None and s.dtype == "F32":
                out[w.name] = (s.name, *_granularity(w, s, declared[w.shard], block_size))
                break
    return out


def unscaled_fp8(ckpt: Checkpoint, pairs: dict) -> list[TensorSpec]:
    """FP8 tensors of rank >= 2 with no scale next to them (their dequantized values are unknown)."""
    return [w for w in ckpt.tensors if w.dtype in _FP8 and len(w.shape) >= 2 and w.name not in pairs]


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
