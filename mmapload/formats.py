"""What a converted checkpoint looks like: pure arithmetic on the input headers, no I/O.

The output keeps the input's shard file names (``model.safetensors`` for a single-file
input). FP8 weights keep their name; their scale follows right after the weight (float32, or
the weight's own dtype with ``scale_dtype="weight"``; an FP8 source's scales: float32).
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

A source that is already FP8 (a weight ``X`` with ``X_scale`` / ``X_scale_inv``, see prequantized.py)
is translated, not re-quantized: the pair is written with the output format's scale name and
shape, where the stream yields it (after the later of the two). Its granularity must be the
one the options ask for, since one ``quantization_config`` describes every weight.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .checkpoint import Checkpoint, TensorSpec
from .dtypes import FP8, dtype_name
from .errors import CheckpointError, OptionsError
from .fp8 import Granularity
from .config import LoadOptions
from .prequantized import fp8_pairs, unscaled_fp8
from .policy import CONV1D, LINEAR, Policy

__all__ = ["FORMATS", "SCALE_SUFFIX", "Entry", "check_format", "scale_suffix", "ignored_modules",
           "quantization_config", "output_layout", "shard_metadata", "convert_policy", "single_file",
           "KEPT_EXPERTS", "KEPT_BY_CONVERT"]

SCALE_SUFFIX = "_scale"
FORMATS = ("compressed-tensors", "fp8")
# compressed-tensors targets "Linear" modules and vLLM's fp8 method LinearBase / per-expert Linear
# weights: a fused [E, rows, cols] expert parameter is no Linear, so neither format can say it is FP8
KEPT_BY_CONVERT = "kept in high precision by convert"
KEPT_EXPERTS = (f"fused experts: {KEPT_BY_CONVERT} (compressed-tensors and vLLM's fp8 "
                "format describe FP8 Linear weights only; stream_quantize quantizes them)")

# (name, safetensors dtype name, header shape): the header entry itself, whatever torch has
# for the dtype (dtypes.torch_dtype_of / torch_shape give the tensor the writer takes)
Entry = tuple[str, str, tuple[int, ...]]


def single_file(ckpt: Checkpoint) -> bool:
    """Whether ``ckpt`` is one ``.safetensors`` file rather than a folder: its root is its only
    shard (``open_checkpoint`` gives a file's checkpoint the resolved file as root). No I/O."""
    return len(ckpt.shards) == 1 and ckpt.root in (ckpt.shards[0].path, ckpt.shards[0].real)


def _shard_names(ckpt: Checkpoint) -> dict[Path, str]:
    """Output file name (relative to the folder) of each input shard, as the input names it:
    Shard paths keep the index's or the folder's names (a Hugging Face cache links them to blobs)."""
    if single_file(ckpt):
        return {ckpt.shards[0].path: "model.safetensors"}
    return {s.path: s.path.relative_to(ckpt.root).as_posix() for s in ckpt.shards}


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
    s = opts.scheme.scale_shape(shape)
    return (1,) if s == () and fmt == "compressed-tensors" else s


def convert_policy(policy: Policy, opts: LoadOptions) -> Policy:
    """What convert quantizes: the policy's Linear weights that the formats can describe. Fused
    experts stay high precision (KEPT_EXPERTS), and so do block-quantized weights whose input
    side is not whole blocks: the formats quantize activations in groups of ``block_size[1]``
    (compressed-tensors' FP8_BLOCK scheme, DeepSeek-style fp8), which must tile the input;
    transformers fails on such a layer. A ragged last block row is fine (DeepSeek-V3 has them)."""
    bc = opts.block_size[1]

    def veto(spec, decision) -> str | None:
        if decision.kind != LINEAR:
            return KEPT_EXPERTS
        if opts.granularity is Granularity.BLOCK and spec.shape[-1] % bc:
            return (f"{spec.shape[-1]} input features are not whole {bc}-wide blocks: {KEPT_BY_CONVERT} "
                    "(activations are quantized in groups of the block width; stream_quantize quantizes it)")
        return None
    return policy.narrowed(veto)


def ignored_modules(ckpt: Checkpoint, policy: Policy) -> list[str]:
    """The Linear modules left in high precision, as compressed-tensors' ``ignore`` (and vLLM fp8's
    ``ignored_layers``) name them: every kept high-precision weight the policy calls a Linear weight
    or a GPT-2 Conv1D weight (engines build Linear layers for those: unlisted, vLLM would make them
    FP8 layers, copy bf16 bytes in and never get a scale), and the model's Linear modules whose
    weight the checkpoint does not hold (a tied lm_head)."""
    out = [spec.name.removesuffix(".weight") for spec in ckpt.tensors
           if spec.name.endswith(".weight") and (d := policy.decide(spec)).kind in (LINEAR, CONV1D)
           and not d.quantize and spec.dtype not in FP8]
    have = {spec.name.removesuffix(".weight") for spec in ckpt.tensors}
    prefix = policy.prefix + "." if policy.prefix else ""
    for module in policy.linear_modules():
        if module not in have and prefix + module not in have and module.removeprefix(prefix) not in have:
            out.append(module)
    return list(dict.fromkeys(out))


def quantization_config(fmt: str, opts: LoadOptions, ignore: list[str]) -> dict:
    """The ``quantization_config`` of config.json for ``fmt`` (see the module docstring)."""
    g, bs = opts.granularity, list(opts.block_size)
    if check_format(fmt, opts) == "fp8":   # vLLM reads ignored_layers; transformers takes it as an alias
        cfg = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic"}
        cfg = {**cfg, "ignored_layers": list(ignore)} if ignore else cfg
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


def _source_pairs(ckpt: Checkpoint, opts: LoadOptions, fmt: str, suffix: str,
                  policy: Policy) -> dict[str, list[Entry]]:
    """FP8 weights already in the source, with their scales: for each member of a pair, the
    entries written at its position (the pair, at the member the stream yields it after: the
    later one in file order; nothing at the other). An FP8 Linear weight without a scale gets
    one of the options' granularity (filled with ``fp8_weight_scale``), or is an OptionsError."""
    order = {s.name: i for i, s in enumerate(ckpt.tensors)}
    at: dict[str, list[Entry]] = {}
    pairs = fp8_pairs(ckpt, policy.config, opts.block_size)
    for w in unscaled_fp8(ckpt, pairs, lambda s: policy.decide(s).kind == LINEAR):
        if opts.fp8_weight_scale is None:
            raise OptionsError(
                f"{w.shard}: tensor {w.name!r} ({w.dtype} {list(w.shape)}, bytes {w.start}..{w.end}) is "
                "FP8 without a scale next to it (no '_scale' / '_scale_inv' tensor), so what it means "
                "is unknown and no quantization_config can describe it: pass fp8_weight_scale=S "
                "(mmapload convert --fp8-weight-scale S; 1.0 if the stored values are the weights "
                "themselves), or convert a high-precision copy of the checkpoint")
        _check_source_pair(w, opts.granularity, opts.block_size, fmt, opts)
        at[w.name] = [(w.name, w.dtype, w.shape), (w.name + suffix, "F32", _scale_out_shape(w.shape, fmt, opts))]
    for name, (scale, gran, block) in pairs.items():
        w = ckpt.get(name)
        _check_source_pair(w, gran, block, fmt, opts)
        first, last = sorted((name, scale), key=order.__getitem__)
        at[first], at[last] = [], [(name, w.dtype, w.shape),
                                   (name + suffix, "F32", _scale_out_shape(w.shape, fmt, opts))]
    return at


def output_layout(ckpt: Checkpoint, opts: LoadOptions, fmt: str, policy: Policy) -> list[tuple[str, list[Entry]]]:
    """``[(shard file name, [(name, safetensors dtype name, shape), ...]), ...]`` of the
    converted checkpoint (see ``Entry``); ``policy`` decides what is quantized (pass
    ``convert_policy(...)``)."""
    suffix = scale_suffix(check_format(fmt, opts), opts)
    names = _shard_names(ckpt)
    if len(set(names.values())) != len(names):
        raise CheckpointError(f"{ckpt.root}: two shards would be written to the same file name: "
                              f"{sorted(names.values())}")
    pairs = _source_pairs(ckpt, opts, fmt, suffix, policy)
    layout, seen = [], {}
    for shard in ckpt.shards:
        entries: list[Entry] = []
        for spec in shard.tensors:
            if spec.name in pairs:
                entries += pairs[spec.name]
            elif policy(spec):
                entries.append((spec.name, dtype_name(opts.fp8_dtype), spec.shape))
                entries.append((spec.name + suffix, dtype_name(opts.scale_dtype_of(spec.torch_dtype)),
                                _scale_out_shape(spec.shape, fmt, opts)))
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
    if opts.scale_dtype != "float32":   # only then: the default output's bytes stay as they were
        info["scale_dtype"] = opts.scale_dtype
    return {"format": "pt", "mmapload": json.dumps(info, separators=(",", ":"))}
