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

from .checkpoint import Checkpoint, TensorSpec
from .dtypes import BITS, FP8, WIDE_FLOATS
from .errors import CheckpointError, HeaderError, NonFiniteError
from .fp8 import Granularity
from .result import Loaded, QuantizedTensor

__all__ = ["fp8_pairs", "paired", "unscaled_fp8", "SCALE_HEADER_DTYPES"]

SUFFIXES = ("_scale", "_scale_inv")
# compressed-tensors stores scales in the weight's dtype: F32, BF16 or F16
SCALE_HEADER_DTYPES = frozenset(n for n in WIDE_FLOATS if BITS[n] <= 32)


def _block(bs, where: str) -> tuple[int, int]:
    if (isinstance(bs, (list, tuple)) and len(bs) == 2
            and all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in bs)):
        return tuple(bs)
    raise CheckpointError(f"{where} is {bs!r}; it must be two positive ints [rows, cols] (e.g. [128, 128]): "
                          "fix config.json")


def _declared(config: dict | None, metadata: dict, root) -> tuple[Granularity | None, tuple[int, int] | None, str]:
    """What the checkpoint says about its FP8 weights: (granularity or None, block size or None,
    where it says so). config.json first (vLLM / DeepSeek ``weight_block_size``; compressed-tensors
    ``strategy`` and ``block_structure``), then what our writer recorded in the shard header.
    A declaration of the wrong type is a ``CheckpointError`` naming the field and the fix."""
    q = (config or {}).get("quantization_config")
    where = f"{root}/config.json: quantization_config"
    if isinstance(q, dict) and q.get("quant_method") == "fp8":
        bs = q.get("weight_block_size")
        if bs is None:
            return Granularity.TENSOR, None, "config.json (fp8 without weight_block_size)"
        return Granularity.BLOCK, _block(bs, f"{where}.weight_block_size"), "config.json weight_block_size"
    if isinstance(q, dict) and q.get("quant_method") == "compressed-tensors":
        groups = q.get("config_groups") or {}
        if not isinstance(groups, dict) or not all(isinstance(g, dict) for g in groups.values()):
            raise CheckpointError(f"{where}.config_groups must map group names to schemes (objects), got "
                                  f"{type(groups).__name__}: fix config.json")
        for name, group in groups.items():
            w = group.get("weights") or {}
            g = w.get("strategy") if isinstance(w, dict) else None
            if g in ("tensor", "channel", "block"):
                bs = w.get("block_structure")
                bs = _block(bs, f"{where}.config_groups.{name}.weights.block_structure") if bs is not None else None
                return Granularity(g), bs, "config.json config_groups strategy"
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
    declared = {sh.path: _declared(config, sh.metadata, ckpt.root) for sh in ckpt.shards}
    for w in ckpt.tensors:
        if w.dtype not in FP8 or len(w.shape) < 2:
            continue
        for suffix in SUFFIXES:
            s = ckpt.get(w.name + suffix)
            if s is not None and s.dtype in SCALE_HEADER_DTYPES:
                out[w.name] = (s.name, *_granularity(w, s, declared[w.shard], block_size))
                break
    return out


def unscaled_fp8(ckpt: Checkpoint, pairs: dict, is_linear) -> list[TensorSpec]:
    """FP8 Linear weights (``is_linear(spec)``) with no scale next to them: what they dequantize
    to is unknown until the caller says (``fp8_weight_scale``)."""
    return [w for w in ckpt.tensors if w.dtype in FP8 and len(w.shape) >= 2 and w.name not in pairs
            and is_linear(w)]


def paired(items: Iterator[tuple[str, Loaded]], pairs: dict, ckpt: Checkpoint | None = None,
           unscaled: dict[str, float] | None = None) -> Iterator[tuple[str, Loaded]]:
    """Join FP8 weights with their scales as ``QuantizedTensor`` (float32 scale); everything else
    passes. ``unscaled``: FP8 weights stored without a scale -> the per-tensor scale to give them
    (the caller's ``fp8_weight_scale``). A scale holding NaN, Inf, zero or a negative value is a
    ``NonFiniteError``: the weight it belongs to cannot be dequantized."""
    unscaled = unscaled or {}
    if not pairs and not unscaled:
        yield from items
        return
    scale_of = {s: w for w, (s, _, _) in pairs.items()}
    waiting: dict[str, torch.Tensor] = {}
    for name, t in items:
        if name in unscaled:
            yield name, QuantizedTensor(t, torch.tensor(unscaled[name], dtype=torch.float32, device=t.device),
                                        torch.bfloat16, Granularity.TENSOR)
            continue
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
        scale = scale.float()
        if not bool((torch.isfinite(scale) & (scale > 0)).all()):
            s = ckpt[pairs[weight][0]] if ckpt is not None else None
            where = f"{s.shard}: " if s is not None else ""
            raise NonFiniteError(f"{where}scale {pairs[weight][0]!r} of FP8 weight {weight!r}"
                                 + (f" (bytes {s.start}..{s.end})" if s is not None else "")
                                 + " holds NaN, Inf, zero or negative values: the weight cannot be "
                                 "dequantized; the checkpoint is corrupt, re-download or re-export it")
        if gran is Granularity.TENSOR and data.dim() == 2:
            scale = scale.reshape(())   # [1] (some writers) and [] mean the same
        yield weight, QuantizedTensor(data, scale, torch.bfloat16, gran, block)
    if waiting:   # only reachable if the stream was cut short by the caller's own filter
        raise HeaderError(f"FP8 weights / scales without their partner: {sorted(waiting)}")
