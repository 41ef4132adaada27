"""Config files, and checkpoints quantized by a method mmapload does not read.

``read_config``: a checkpoint folder's config.json (None without one). ``refuse_other_methods``:
GPTQ, AWQ, bitsandbytes, integer or NVFP4 compressed-tensors, MXFP4, ... store packed integers and
their own scales, not floats mmapload could re-quantize; quantizing around them would write a
checkpoint no engine reads correctly, so they are refused, by their config or by their tensor names.
"""

from __future__ import annotations

import json
from pathlib import Path

from .checkpoint import Checkpoint
from .dtypes import FP8, WIDE_FLOATS
from .errors import CheckpointError

__all__ = ["QuantizedSourceError", "read_config", "refuse_other_methods"]

FLOAT_DTYPES = WIDE_FLOATS


class QuantizedSourceError(CheckpointError):
    """The source checkpoint is already quantized by a method mmapload does not read (GPTQ, AWQ, ...)."""


def read_config(root: Path) -> dict | None:
    path = root / "config.json"
    if not root.is_dir() or not path.is_file():
        return None
    try:
        cfg = json.loads(path.read_text("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e}); fix or remove it") from None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{path}: holds a JSON {type(cfg).__name__}, not an object; fix or remove it")
    return cfg


# quant_method values (config.json quantization_config) of formats whose weights are not
# high-precision floats mmapload can re-quantize, and tensor-name endings that give them away
_OTHER_METHODS = ("gptq", "awq", "bitsandbytes", "aqlm", "hqq", "eetq", "exl2", "marlin", "quanto",
                  "torchao", "gguf", "mxfp4", "modelopt", "bitnet", "vptq", "higgs", "spqr", "fbgemm_fp8")
_PACKED_SUFFIXES = {".qweight": "GPTQ/AWQ", ".qzeros": "GPTQ/AWQ", ".g_idx": "GPTQ", ".SCB": "bitsandbytes int8",
                    ".weight_packed": "compressed-tensors packed int", ".absmax": "bitsandbytes 4-bit",
                    "_blocks": "MXFP4 (gpt-oss)", ".weight_global_scale": "NVFP4"}
_PACKED_ENDINGS = tuple(_PACKED_SUFFIXES)
_BNB_STATS = (".SCB", ".absmax")   # float statistics next to bitsandbytes' int8 / 4-bit weights


def _int_scheme(q: dict) -> bool:
    """A compressed-tensors config whose weights are integers (naive-quantized int8, ...)."""
    groups = q.get("config_groups")
    return isinstance(groups, dict) and any(
        isinstance(g, dict) and isinstance(g.get("weights"), dict) and g["weights"].get("type") == "int"
        for g in groups.values())


def refuse_other_methods(ckpt: Checkpoint, cfg: dict | None) -> None:
    q = (cfg or {}).get("quantization_config")
    method = q.get("quant_method") if isinstance(q, dict) else None
    fmt = q.get("format") if isinstance(q, dict) else None
    where = f"{ckpt.root / 'config.json'}: quantization_config"
    if isinstance(method, str) and (method.lower() in _OTHER_METHODS or (
            method == "compressed-tensors" and (fmt not in (None, "float-quantized", "naive-quantized")
                                                or _int_scheme(q)))):
        raise QuantizedSourceError(
            f"{where} says quant_method {method!r}" + (f" (format {fmt!r})" if fmt else "") +
            ": the checkpoint is already quantized by another method, whose weights are not floats "
            "mmapload can re-quantize; convert the original bf16 / fp16 / fp32 checkpoint instead")
    for spec in ckpt.tensors:   # one endswith per tensor: headers may hold millions of names
        if spec.name.endswith(_PACKED_ENDINGS) and (spec.dtype not in FLOAT_DTYPES | FP8
                                                    or spec.name.endswith(_BNB_STATS)):
            what = next(w for suffix, w in _PACKED_SUFFIXES.items() if spec.name.endswith(suffix))
            raise QuantizedSourceError(
                f"{spec.shard}: tensor {spec.name!r} ({spec.dtype}, bytes {spec.start}..{spec.end}) "
                f"looks like {what} packed weights: the checkpoint is already quantized by another "
                "method; convert the original bf16 / fp16 / fp32 checkpoint instead")
