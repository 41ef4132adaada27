"""What a converted checkpoint looks like: pure arithmetic on the input headers, no I/O.

The output keeps the input's shard file names (``model.safetensors`` for a single-file
input). FP8 weights keep their name; their float32 scale follows right after the weight.
Other tensors are copied bit for bit. Each header's ``__metadata__`` is
``{"format": "pt", "mmapload": "<options as JSON>"}``.

``format`` says which engines' layout the output follows (the copied ``config.json`` gets
its ``quantization_config``; a source without a config.json, e.g. a single file, gets none):

- ``"compressed-tensors"`` (default; vLLM, transformers): ``<module>.weight`` FP8 e4m3 and
  ``<module>.weight_scale`` float32 ``[1]`` (tensor), ``[out, 1]`` (channel) or the block grid;
  ``ignore`` lists the 2-D weights kept in high precision (e.g. ``lm_head``).
- ``"fp8"`` (vLLM's native method, DeepSeek-V3): ``<module>.weight_scale`` ``[]`` per tensor, or
  ``<module>.weight_scale_inv`` (block grid; dequantize is ``q * s`` despite the name) with
  ``weight_block_size``. It has no per-channel scheme: "channel" is an OptionsError.
Both read FP8 as e4m3 only: fp8_dtype=float8_e5m2 is an OptionsError.

A source that is already FP8 (a weight ``X`` with ``X_scale`` / ``X_scale_inv``, see pairs.py)
is translated, not re-quantized: the pair is written with the output format's scale name and
shape, where the stream yields it (after the later of the two). Its granularity must be the
one the options ask for, since one ``quantization_config`` describes every weight.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .checkpoint import INDEX_NAME, WIDE_FLOATS, Checkpoint, TensorSpec, dtype_name
from .errors import CheckpointError, OptionsError
from .fp8 import Granularity, scale_shape
from .options import LoadOptions, should_quantize
from .pairs import fp8_pairs

__all__ = ["FORMATS", "SCALE_SUFFIX", "Entry", "check_format", "scale_suffix", "ignored_modules",
           "quantization_config", "output_layout", "shard_metadata"]

SCALE_SUFFIX = "_scale"
FORMATS = ("compressed-tensors", "fp8")

# (name, safetensors dtype name, header shape): the header entry itself, whatever torch has
# for the dtype (checkpoint.torch_dtype_of / torch_shape give the tensor the writer takes)
Entry = tuple[str, str, tuple[int, ...]]


def _shard_names(ckpt: Checkpoint) -> dict[Path, str]:
    """Output file name (relative to the folder) of each input shard, as the input names it.

    Shard paths in a Checkpoint are resolved (a Hugging Face cache links them to blobs), so
    the names come from the index or the folder listing, not from the resolved paths.
    """
    root = ckpt.root
    if not root.is_dir():
        return {ckpt.shards[0].path: "model.safetensors"}
    if (root / INDEX_NAME).is_file():
        names = json.loads((root / INDEX_NAME).read_text("utf-8"))["weight_map"].values()
    else:
        names = [p.name for p in root.iterdir() if p.name.endswith(".safetensors")]
    by_path = {(root / n).resolve(): n for n in sorted(set(names))}
    return {s.path: by_path.get(s.path, s.path.name) for s in ckpt.shards}


def check_format(fmt, opts: LoadOptions) -> str:
    if fmt not in FORMATS:
        raise OptionsError(f"unknown format {fmt!r}; use one of {list(FORMATS)}")
    if opts.fp8_dtype is not torch.float8_e4m3fn:
        raise OptionsError(f"format={fmt!r} stores FP8 as e4m3 only (vLLM and compressed-tensors read "
                           f"every FP8 weight as float8_e4m3fn); {opts.fp8_dtype} would be misread: "
                           "convert with fp8_dtype=torch.float8_e4m3fn")
    if fmt == "fp8" and opts.granularity is Granularity.CHANNEL:
        raise OptionsError("format='fp8' (vLLM's native fp8 method) has no per-channel weight scales, "
                           "only per-tensor and block; use format='compressed-tensors' for "
                           "granularity='channel', or granularity='tensor' / 'block'")
    return fmt


def scale_suffix(fmt: str, opts: LoadOptions) -> str:
    """What a weight's scale is named after: ``_scale_inv`` for fp8 blocks, else ``_scale``."""
    return "_scale_inv" if fmt == "fp8" and opts.granularity is Granularity.BLOCK else SCALE_SUFFIX


def _scale_out_shape(shape, fmt: str, opts: LoadOptions) -> tuple[int, ...]:
    """compressed-tensors registers a per-tensor scale as shape (1,): so is it written."""
    s = scale_shape(shape, opts.granularity, opts.block_size)
    return (1,) if s == () and fmt == "compressed-tensors" else s


def ignored_modules(ckpt: Checkpoint, opts: LoadOptions) -> list[str]:
    """Linear-like modules kept in high precision: every 2-D float ``<module>.weight`` that is
    not quantized, except embeddings and norms (which are no Linear)."""
    out = []
    for spec in ckpt.tensors:
        low = spec.name.lower()
        if (spec.dtype in WIDE_FLOATS and len(spec.shape) == 2 and spec.name.endswith(".weight")
                and not should_quantize(spec, opts) and "embed" not in low and "norm" not in low):
            out.append(spec.name[: -len(".weight")])
    return out


def quantization_config(fmt: str, opts: LoadOptions, ignore: list[str]) -> dict:
    """The ``quantization_config`` of config.json for ``fmt`` (see the module docstring)."""
    g, bs = opts.granularity, list(opts.block_size)
    if check_format(fmt, opts) == "fp8":
        cfg = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic"}
        return {**cfg, "weight_block_size": bs} if g is Granularity.BLOCK else cfg
    weights = {"num_bits": 8, "type": "float", "symmetric": True, "strategy": g.value, "dynamic": False}
    acts = {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "token", "dynamic": True}
    if g is Granularity.BLOCK:   # as compressed-tensors' FP8_BLOCK preset: activations per 1 x bc group
        weights["block_structure"] = bs
        acts.update(strategy="group", group_size=bs[1])
    return {"quant_method": "compressed-tensors", "format": "float-quantized",
            "quantization_status": "compressed", "ignore": list(ignore),
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights,
                                          "input_activations": acts}}}


def _check_source_pair(w: TensorSpec, gran: Granularity, block, fmt: str, opts: LoadOptions) -> None:
    if w.torch_dtype is not torch.float8_e4m3fn:
        raise OptionsError(f"{w.shard}: weight {w.name!r} is already FP8 as {w.torch_dtype}; format={fmt!r} "
                           "stores e4m3 only, and mmapload does not re-quantize FP8 weights: "
                           "convert a higher-precision copy of the checkpoint instead")
    if gran is not opts.granularity or (gran is Granularity.BLOCK and tuple(block) != opts.block_size):
        fix = f"granularity={gran.value!r}" + (f", block_size={tuple(block)}" if gran is Granularity.BLOCK else "")
        have = f"{gran.value} ({block[0]}x{block[1]})" if gran is Granularity.BLOCK else gran.value
        raise OptionsError(f"{w.shard}: weight {w.name!r} is already FP8 with {have} scales, and the "
                           "output's quantization_config describes every weight with one scheme: "
                           f"convert with {fix}")


def _source_pairs(ckpt: Checkpoint, opts: LoadOptions, fmt: str, suffix: str) -> dict[str, list[Entry]]:
    """FP8 weights already in the source, with their scales: for each member of a pair, the
    entries written at its position (the pair, at the member the stream yields it after: the
    later one in file order; nothing at the other)."""
    order = {s.name: i for i, s in enumerate(ckpt.tensors)}
    at: dict[str, list[Entry]] = {}
    for name, (scale, gran, block) in fp8_pairs(ckpt).items():
        w = ckpt.get(name)
        _check_source_pair(w, gran, block, fmt, opts)
        first, last = sorted((name, scale), key=order.__getitem__)
        at[first], at[last] = [], [(name, w.dtype, w.shape),
                                   (name + suffix, "F32", _scale_out_shape(w.shape, fmt, opts))]
    return at


def output_layout(ckpt: Checkpoint, opts: LoadOptions,
                  fmt: str = "compressed-tensors") -> list[tuple[str, list[Entry]]]:
    """``[(shard file name, [(name, safetensors dtype name, shape), ...]), ...]`` of the
    converted checkpoint (see ``Entry``)."""
    suffix = scale_suffix(check_format(fmt, opts), opts)
    names = _shard_names(ckpt)
    if len(set(names.values())) != len(names):
        raise CheckpointError(f"{ckpt.root}: two shards would be written to the same file name: "
                              f"{sorted(names.values())}")
    pairs = _source_pairs(ckpt, opts, fmt, suffix)
    layout, seen = [], {}
    for shard in ckpt.shards:
        entries: list[Entry] = []
        for spec in shard.tensors:
            if spec.name in pairs:
                entries += pairs[spec.name]
            elif should_quantize(spec, opts):
                entries.append((spec.name, dtype_name(opts.fp8_dtype), spec.shape))
                entries.append((spec.name + suffix, "F32", _scale_out_shape(spec.shape, fmt, opts)))
            else:   # its own dtype name and shape: the header entry is the source's, bytes and all
                entries.append((spec.name, spec.dtype, spec.shape))
        for name, _, _ in entries:
            if name in seen:
                raise CheckpointError(
                    f"{ckpt.root}: output tensor name {name!r} would be written twice (in "
                    f"{seen[name]} and {names[shard.path]}); a weight's scale is named "
                    f"'<weight>{suffix}' and the input already holds a tensor of that name; "
                    f"skip the weight (skip=...) or rename the tensor")
            seen[name] = names[shard.path]
        layout.append((names[shard.path], entries))
    return layout


def shard_metadata(opts: LoadOptions, fmt: str) -> dict[str, str]:
    info = {"granularity": opts.granularity.value, "fp8_dtype": str(opts.fp8_dtype).removeprefix("torch."),
            "block_size": list(opts.block_size), "scale_suffix": scale_suffix(fmt, opts)}
    return {"format": "pt", "mmapload": json.dumps(info, separators=(",", ":"))}
