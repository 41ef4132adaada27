"""Tensor parallelism as arithmetic: the part of each tensor rank ``tp_rank`` of ``tp_size`` holds,
as index ranges (tp_ranges.py turns them into file bytes and scale-grid slices). Pure: no I/O, no
torch.distributed (the load wires it in later).

vLLM's layout (``vllm/model_executor/layers/linear.py``, ``fused_moe/layer.py``); a weight is
``[out, in]``, a fused expert stack ``[experts, out, in]``:
- column-parallel (``ColumnParallelLinear``): ``q_proj k_proj v_proj gate_proj up_proj qkv_proj
  gate_up_proj``, ``w1 w3`` under ``experts``, ``embed_tokens`` / ``lm_head`` by vocabulary rows:
  the output features (dim -2) in tp_size equal parts, their bias (dim -1) with them;
- row-parallel (``RowParallelLinear``): ``o_proj down_proj``, ``w2`` under ``experts``: the input
  features (dim -1); their bias is replicated (added once, after the all-reduce);
- all else replicated: norms, routers, GPT-2's ``Conv1D`` (``c_attn c_proj c_fc``, ``[in, out]``),
  every attribute but ``weight`` / ``bias`` (weight scales: ``tp_ranges.scale_slice`` of the weight's).
Fused tensors split per logical part, parts in order (``MergedColumnParallelLinear.weight_loader``:
rank r holds the r-th ``output_size // tp_size`` of each; ``gate_up_proj``: halves).
``QKVParallelLinear`` splits q, k, v by heads (``num_heads % tp_size == 0``); with ``tp_size >=
num_kv_heads`` a kv head is shared by ``num_kv_head_replicas = tp_size // num_kv_heads`` ranks
(``tp_size % num_kv_heads == 0``): ``shard_rank = tp_rank // num_kv_head_replicas``, i.e. kv head
``tp_rank * num_kv_heads // tp_size``; separate ``k_proj`` / ``v_proj`` load the same way (pass
:class:`Heads`). ``FusedMoE._load_w13`` / ``_load_w2`` narrow expert weights likewise.
gpt-oss stores its fused experts ``[experts, in, out]`` (``x @ W``) with gate and up interleaved
(``gate_up_proj[..., 0::2]`` / ``[..., 1::2]``): with ``in_out=True`` column-parallel cuts the
last dim in one range (pairs stay together) and row-parallel the one before, as vLLM's
``gpt_oss.py`` narrows them (``weight[:, :, 2 * start:2 * end]``, ``weight[:, start:end, :]``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping

from ._math import as_int
from .errors import OptionsError, TPError

__all__ = ["COLUMN", "ROW", "REPLICATE", "TPPlan", "tp_plan", "Heads", "Sharding", "Slice", "sharding_of",
           "shard_of", "where", "block_of", "cut"]

COLUMN, ROW, REPLICATE = "column", "row", "replicate"
_COLUMN = frozenset({"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "qkv_proj", "gate_up_proj",
                     "embed_tokens", "lm_head",
                     "q_b_proj", "kv_b_proj",        # DeepSeek MLA (q_a / kv_a: replicated, as in vLLM)
                     "fc1", "dense_h_to_4h"})        # OPT / BART / CLIP / Whisper, GPT-NeoX MLPs
_ROW = frozenset({"o_proj", "down_proj", "out_proj", "fc2", "dense_4h_to_h"})
_VOCAB = frozenset({"embed_tokens", "lm_head"})   # VocabParallelEmbedding / ParallelLMHead


@dataclass(frozen=True)
class TPPlan:
    """Overrides of the default rule, (pattern, style) pairs, first match wins. Patterns are
    compressed-tensors style: an exact module or tensor name, or ``re:`` + a regex matched at the
    start of the module (or tensor) name; a module's rule covers its weight and bias."""

    rules: tuple[tuple[str, str], ...] = ()

    def style(self, name: str) -> str | None:
        """"column" | "row" | "replicate" for tensor ``name``, or None when no rule matches."""
        module = name.rpartition(".")[0]
        for pattern, style in self.rules:
            regex = pattern[3:] if pattern.startswith("re:") else None
            if (re.match(regex, module) or re.match(regex, name)) if regex else pattern in (module, name):
                return style
        return None


def tp_plan(value) -> TPPlan:
    """The ``tp_plan`` option validated: None, a :class:`TPPlan`, or a mapping pattern -> "column" |
    "row" | "replicate" (kept in order). OptionsError on anything else or a regex that won't compile."""
    if value is None or isinstance(value, TPPlan):
        return value or TPPlan()
    if not isinstance(value, Mapping):
        raise OptionsError(f"tp_plan must map name patterns to 'column' | 'row' | 'replicate', got {value!r}")
    for pattern, style in value.items():
        if not isinstance(pattern, str) or pattern in ("", "re:") or style not in (COLUMN, ROW, REPLICATE):
            raise OptionsError(f"tp_plan[{pattern!r}] = {style!r}: use a name or 're:' pattern -> "
                               f"'column', 'row' or 'replicate'")
        try:
            if pattern.startswith("re:"):
                re.compile(pattern[3:])
        except re.error as e:
            raise OptionsError(f"tp_plan pattern {pattern!r} is not a valid regex: {e}") from None
    return TPPlan(tuple(value.items()))


@dataclass(frozen=True)
class Heads:
    """Attention geometry (config.json: ``num_attention_heads``, ``num_key_value_heads``,
    ``head_dim``; ``v_head_dim`` defaults to ``head_dim``). Needed for a fused ``qkv_proj`` and for
    ``k_proj`` / ``v_proj`` when ``num_kv_heads < tp_size`` (kv heads replicated)."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    v_head_dim: int | None = None

    def __post_init__(self):
        for f, v in vars(self).items():
            if (v is not None or f != "v_head_dim") and (as_int(v) or 0) < 1:
                raise OptionsError(f"Heads.{f} must be a positive int, got {v!r}")


@dataclass(frozen=True)
class Sharding:
    """How a tensor is cut: ``dim`` None = replicated; ``parts``: logical part sizes along ``dim``;
    ``heads`` / ``kv``: per part, its head count and whether its heads may be replicated (kv)."""

    dim: int | None
    parts: tuple[int, ...] = ()
    heads: tuple[int, ...] = ()
    kv: tuple[bool, ...] = ()


@dataclass(frozen=True)
class Slice:
    """A rank's part of tensor ``name`` (``full_shape``): the index ranges ``[lo, hi)`` along ``dim``
    (one per logical part, concatenated in order), of the rank's ``shape``. ``dim`` None: all of it."""

    name: str
    full_shape: tuple[int, ...]
    dim: int | None
    ranges: tuple[tuple[int, int], ...]
    shape: tuple[int, ...]


# ``count`` runs of ``length`` bytes from file offset ``first_lo``, ``stride`` bytes apart


def _role(name: str) -> tuple[str | None, str, bool]:
    """(module leaf, attribute, under experts): ``a.q_proj.weight`` -> ("q_proj", "weight", False);
    a fused ``mlp.experts.gate_up_proj`` is its own module's weight (``..._bias``: its bias)."""
    parts = name.split(".")
    experts = "experts" in parts[:-1]
    if parts[-1] in ("weight", "bias") and len(parts) > 1:
        return parts[-2], parts[-1], experts
    if experts:
        leaf = parts[-1].removesuffix("_bias")
        return leaf, "bias" if leaf != parts[-1] else "weight", True
    return None, parts[-1], False


def _default_style(leaf, experts: bool) -> str:
    if leaf in _COLUMN or (experts and leaf in ("w1", "w3")):
        return COLUMN
    return ROW if leaf in _ROW or (experts and leaf == "w2") else REPLICATE


def where(name, shape, dim=None) -> str:
    """How messages name a tensor (and its dim): tp_ranges shares it."""
    return f"tensor {name!r} (shape {list(shape)}{'' if dim is None else f', dim {dim}'})"


def sharding_of(name: str, shape, *, plan=None, fused=None, heads: Heads | None = None,
                in_out: bool = False) -> Sharding:
    """How tensor ``name`` of ``shape`` is cut: by the first matching ``plan`` rule, else the default
    rule (module docstring). ``fused``: logical part sizes along the parallel dim (default:
    ``gate_up_proj`` in halves, ``qkv_proj`` from ``heads``). ``in_out``: fused experts stored
    ``[experts, in, out]`` with gate / up interleaved (gpt-oss). TPError: qkv_proj without heads /
    fused, or parts that do not add up; OptionsError: bad ``fused`` / ``plan``."""
    shape = tuple(int(d) for d in shape)
    leaf, attr, experts = _role(name)
    style = tp_plan(plan).style(name) or _default_style(leaf, experts)
    nd = len(shape)
    if in_out and experts and nd >= 2 and attr == "weight" and style in (COLUMN, ROW):
        return Sharding(nd - 1 if style == COLUMN else nd - 2, (shape[nd - 1 if style == COLUMN else nd - 2],))
    if in_out and experts and attr == "bias" and style == COLUMN and nd >= 1:
        return Sharding(nd - 1, (shape[-1],))
    if in_out and attr == "sinks" and nd == 1 and tp_plan(plan).style(name) is None:
        return Sharding(0, (shape[0],))   # gpt-oss's per-head attention sinks: narrowed by heads, as vLLM does
    if style == COLUMN and attr in ("weight", "bias") and nd >= 1:
        dim = nd - 2 if attr == "weight" and nd >= 2 else nd - 1
    elif style == ROW and attr == "weight" and nd >= 2:
        dim = nd - 1
    else:
        return Sharding(None)
    size, hs, kv = shape[dim], (), ()
    if fused is not None:
        parts = tuple(as_int(p) for p in fused)
        if not parts or any(p is None or p <= 0 for p in parts):
            raise OptionsError(f"fused must be positive part sizes, got {fused!r} for {where(name, shape)}")
    elif style == COLUMN and leaf == "qkv_proj":
        if heads is None:
            raise TPError(f"{where(name, shape, dim)} is a fused qkv_proj: pass heads=Heads(num_heads, "
                          f"num_kv_heads, head_dim) or fused=(q, k, v) sizes to split it per part")
        parts = (heads.num_heads * heads.head_dim, heads.num_kv_heads * heads.head_dim,
                 heads.num_kv_heads * (heads.v_head_dim or heads.head_dim))
        hs, kv = (heads.num_heads, heads.num_kv_heads, heads.num_kv_heads), (False, True, True)
    elif style == COLUMN and leaf == "gate_up_proj":
        parts = (size // 2, size - size // 2)
        if size % 2:
            raise TPError(f"{where(name, shape, dim)}: a fused gate_up_proj of odd size; pass fused=(gate, up)")
    elif style == COLUMN and heads is not None and leaf in ("q_proj", "k_proj", "v_proj"):
        n = heads.num_heads if leaf == "q_proj" else heads.num_kv_heads
        parts, hs, kv = (size,), (n,), (leaf != "q_proj",)
        if size % n:
            raise TPError(f"{where(name, shape, dim)} does not hold {n} heads of equal size; check heads={heads}")
    else:
        parts = (size,)
    if sum(parts) != size:
        raise TPError(f"{where(name, shape, dim)}: parts {list(parts)} add up to {sum(parts)}; fix fused= / heads=")
    return Sharding(dim, parts, hs, kv)


def block_of(block, name) -> tuple[int, int] | None:
    if block is None:
        return None
    b = tuple(as_int(v) for v in block) if isinstance(block, (tuple, list)) else ()
    if len(b) != 2 or not all(v and v > 0 for v in b):
        raise OptionsError(f"block must be two positive ints (rows, cols), got {block!r} ({name!r})")
    return b


def shard_of(name: str, shape, tp_rank: int, tp_size: int, *, plan=None, fused=None,
             heads: Heads | None = None, block=None, in_out: bool = False) -> Slice:
    """Rank ``tp_rank``'s :class:`Slice` of tensor ``name`` of ``shape`` (``plan`` / ``fused`` /
    ``heads``: :func:`sharding_of`). ``block=(br, bc)``: it gets block scales, so each range must
    start and end on the block grid (or at the dim's end) for rank scales == TP=1 scales, sliced.
    OptionsError: a bad tp_rank / tp_size / block. TPError (naming tensor, shape, dim, tp_size,
    fix): tp_size does not divide a dim or part, kv heads it can't replicate, off the block grid."""
    if (as_int(tp_size) or 0) < 1:
        raise OptionsError(f"tp_size must be an int >= 1, got {tp_size!r} (loading tensor {name!r})")
    if as_int(tp_rank) is None or not 0 <= tp_rank < tp_size:
        raise OptionsError(f"tp_rank must be an int in [0, {tp_size}), got {tp_rank!r} (loading tensor {name!r})")
    shape, block = tuple(int(d) for d in shape), block_of(block, name)
    sh = sharding_of(name, shape, plan=plan, fused=fused, heads=heads, in_out=in_out)
    if sh.dim is None:
        return Slice(name, shape, None, (), shape)
    if tp_size > 1 and shape[sh.dim] % 64 and _role(name)[0] in _VOCAB and tp_plan(plan).style(name) is None:
        raise TPError(f"{where(name, shape, sh.dim)}: vLLM pads a vocabulary to a multiple of 64 and cuts the padded "
                      f"rows ({shape[sh.dim]} -> {-(-shape[sh.dim] // 64) * 64}), so its ranks' parts are not "
                      f"{tp_size} equal parts of {shape[sh.dim]}; replicate it (tp_plan={{{name.rpartition('.')[0]!r}: "
                      "'replicate'}) and let the engine narrow it, or cut equal parts ('column')")
    ranges, off = [], 0
    for i, size in enumerate(sh.parts):
        n = sh.heads[i] if sh.heads else size
        if sh.heads and sh.kv[i] and n < tp_size:            # fewer kv heads than ranks: replicated
            if tp_size % n:
                _indivisible(name, shape, sh, i, tp_size, f"cannot be replicated evenly (vLLM needs a multiple of {n})")
            head, per = tp_rank * n // tp_size, size // n
            lo, hi = off + head * per, off + (head + 1) * per
        elif n % tp_size:
            _indivisible(name, shape, sh, i, tp_size, "does not divide it")
        else:
            lo, hi = off + tp_rank * (size // tp_size), off + (tp_rank + 1) * (size // tp_size)
        ranges.append((lo, hi))
        off += size
    if block and len(shape) >= 2 and sh.dim >= len(shape) - 2:
        b = block[0] if sh.dim == len(shape) - 2 else block[1]
        for lo, hi in ranges:
            if lo % b or (hi % b and hi != shape[sh.dim]):
                raise TPError(f"{where(name, shape, sh.dim)}: rank {tp_rank} of tp_size={tp_size} holds [{lo}, {hi}), off the "
                              f"{block[0]}x{block[1]} block grid; use granularity='channel', or a tp_size "
                              f"whose shards are whole blocks, or replicate it")
    return cut(name, shape, sh.dim, tuple(ranges))


def _indivisible(name, shape, sh: Sharding, i, tp_size, why):
    n, unit = (sh.heads[i], "heads") if sh.heads else (sh.parts[i], "rows/cols")
    what = f"part {i} of {list(sh.parts)} ({n} {unit})" if len(sh.parts) > 1 else f"its {n} {unit}"
    raise TPError(f"{where(name, shape, sh.dim)}: {what}; tp_size={tp_size} {why}; use another tp_size, or "
                  f"replicate it (tp_plan={{{_every_layer(name.rpartition('.')[0])!r}: 'replicate'}})")


def _every_layer(module: str) -> str:
    """A tp_plan pattern for ``module`` in every layer: ``re:`` + its name, layer numbers as ``\\d+``."""
    return "re:" + re.sub(r"\\\.\d+\\\.", r"\\.\\d+\\.", re.escape(module)) + "$" if re.search(r"\.\d+\.", module) \
        else module


def cut(name, shape, dim, ranges) -> Slice:
    return Slice(name, shape, dim, ranges, shape[:dim] + (sum(hi - lo for lo, hi in ranges),) + shape[dim + 1:])
