"""A load's tensor-parallel view of a checkpoint, before any I/O: which part of each tensor this
rank loads (tp.py's rule under the load's ``tp_plan``, heads from config.json), and where that
part's bytes lie in the file, as plan.py cuts them into pieces.

A sharded quantized matrix ``[rows, cols]`` (per expert) becomes a local ``[rows', cols']``
matrix made of *bands*: runs of the file's rows (a column-parallel slice: one band per logical
part, e.g. q / k / v of a fused qkv_proj) narrowed to the columns ``[shift, shift + cols')``
(a row-parallel slice). A kept (unquantized) tensor becomes the byte ranges of its slice in the
order its local tensor lays them out (tp_ranges). Replicated tensors have no entry: all of it.
"""

from __future__ import annotations

from typing import Callable, Iterator, Mapping

from .checkpoint import TensorSpec
from .dtypes import BITS
from .errors import TPError, warn
from .scheme import Granularity, PerBlock, Scheme
from .tp import Heads, Slice, TPPlan, shard_of, tp_plan, where
from .tp_ranges import byte_ranges, scale_slice, strided_ranges

__all__ = ["heads_of", "experts_in_out", "rank_slices", "warn_unmatched", "bands", "kept_segments"]


def heads_of(config: dict | None) -> Heads | None:
    """The attention geometry of config.json (its ``text_config`` for a multimodal model), None
    when it does not say: ``num_attention_heads``, ``num_key_value_heads`` (default: as many),
    ``head_dim`` (default ``hidden_size // num_attention_heads``)."""
    for cfg in (config or {}, (config or {}).get("text_config") or {}):
        n = cfg.get("num_attention_heads") if isinstance(cfg, dict) else None
        if isinstance(n, int) and n > 0:
            kv = cfg.get("num_key_value_heads") or n
            hd = cfg.get("head_dim") or (cfg.get("hidden_size") or 0) // n
            if isinstance(kv, int) and isinstance(hd, int) and kv > 0 and hd > 0:
                return Heads(n, kv, hd)
    return None


_ATTENTION = frozenset({"q_proj", "k_proj", "v_proj", "qkv_proj"})


def _leaf(name: str) -> str:
    """The module's last name: ``a.q_proj.weight`` -> "q_proj"."""
    parts = name.split(".")
    return parts[-2] if len(parts) > 1 else ""


def warn_unmatched(plan, names) -> None:
    """A ``tp_plan`` pattern that matches no tensor is most likely a typo: say so (as for ``skip``)."""
    plan, names = tp_plan(plan), list(names)
    for pattern, style in plan.rules:
        one = TPPlan(((pattern, style),))
        if not any(one.style(n) for n in names):
            warn(f"tp_plan pattern {pattern!r} matches no tensor (a module or tensor name, exactly, or 're:' + a "
                 "regex matched from the start of the name, e.g. 're:.*\\.mlp\\.up_proj')")


def _heads_for(spec: TensorSpec, heads: Heads | None) -> Heads | None:
    """``heads`` where they describe this tensor (a vision tower's q_proj has other heads: split
    it evenly instead)."""
    if heads is None or not spec.shape:
        return None
    leaf = _leaf(spec.name)
    n = spec.shape[-2] if len(spec.shape) >= 2 else spec.shape[-1]
    want = {"q_proj": heads.num_heads * heads.head_dim, "k_proj": heads.num_kv_heads * heads.head_dim,
            "v_proj": heads.num_kv_heads * heads.head_dim,
            "qkv_proj": (heads.num_heads + 2 * heads.num_kv_heads) * heads.head_dim}.get(leaf)
    return heads if want is None or want == n else None


def experts_in_out(config: dict | None) -> bool:
    """Fused experts stored ``[experts, in, out]``, gate / up interleaved: gpt-oss (config.json's
    ``model_type``)."""
    return isinstance(config, dict) and config.get("model_type") == "gpt_oss"


def rank_slices(tensors: Iterator[TensorSpec], quantize: Callable[[TensorSpec], bool], scheme: Scheme,
                tp_rank: int, tp_size: int, *, plan=None, heads: Heads | None = None,
                pairs: Mapping[str, tuple] | None = None, in_out: bool = False) -> dict[str, Slice]:
    """name -> this rank's :class:`Slice` for every tensor it holds a part of (replicated ones
    are absent). ``quantize(spec)``: the policy; a tensor quantized with ``PerBlock`` scales
    must be cut on its block grid. ``pairs``: an FP8 source's weight -> (scale name,
    granularity, block) (prequantized.fp8_pairs): a scale is cut as its weight is. ``in_out``:
    fused experts stored ``[experts, in, out]`` (gpt-oss; tp.sharding_of).
    TPError (naming the tensor and the fix) for a cut tp.py refuses or a sub-byte dtype."""
    tensors = list(tensors)
    pairs = pairs or {}
    plan = tp_plan(plan)
    scale_of = {s: w for w, (s, _, _) in pairs.items()}
    out: dict[str, Slice] = {}
    for spec in tensors:
        if spec.name in scale_of:
            continue   # below, from its weight's slice
        block = None
        if spec.name in pairs:                # an FP8 source's weight: its scales' block grid
            _, gran, b = pairs[spec.name]
            block = b if gran is Granularity.BLOCK else None
        elif isinstance(scheme, PerBlock) and quantize(spec):
            block = scheme.block
        if heads is None and tp_size > 1 and _leaf(spec.name) in _ATTENTION and plan.style(spec.name) is None:
            raise TPError(f"{where(spec.name, spec.shape)}: no head geometry (config.json's num_attention_heads / "
                          "num_key_value_heads / head_dim): an even cut may split heads, or fail to replicate kv "
                          "heads when there are fewer than ranks; load the model's folder (with its config.json; "
                          "a file is loaded alone), or say how to cut it (tp_plan: 'column' for even parts, or 'replicate')")
        h = _heads_for(spec, heads)
        try:
            sl = shard_of(spec.name, spec.shape, tp_rank, tp_size, plan=plan, heads=h, block=block, in_out=in_out)
        except TPError as e:
            if spec.name in pairs and "block grid" in str(e):   # granularity= does not re-cut an FP8 source
                raise TPError(f"{where(spec.name, spec.shape)} is FP8 with {block[0]}x{block[1]} block scales: "
                              f"tp_size={tp_size} would cut inside a block; use a tp_size whose parts are whole "
                              "blocks, or replicate it (tp_plan)") from None
            raise
        if sl.dim is None:
            continue
        if BITS[spec.dtype] % 8:
            raise TPError(f"{where(spec.name, spec.shape, sl.dim)}: {spec.dtype} packs values into bytes and "
                          f"is not cut; replicate it (tp_plan={{{spec.name!r}: 'replicate'}})")
        out[spec.name] = sl
    by_name = {s.name: s for s in tensors}
    for w, (s, gran, block) in pairs.items():
        if w in out and s in by_name:
            sl = scale_slice(out[w], by_name[s].shape, block=block if gran is Granularity.BLOCK else None)
            if sl.dim is not None:
                out[s] = Slice(s, sl.full_shape, sl.dim, sl.ranges, sl.shape)
    return out


def bands(shape: tuple[int, ...], sl: Slice | None) -> tuple[list[tuple[int, int, int]], int, int, int]:
    """(bands, rows', cols', shift) of a quantized matrix's local part: bands ``(local row0,
    file row0, rows)``, in local order; its columns ``[shift, shift + cols')`` of the file's."""
    rows, cols = shape[-2], shape[-1]
    if sl is None or sl.dim is None:
        return [(0, 0, rows)], rows, cols, 0
    if sl.dim == len(shape) - 1:            # row-parallel: a column range of every row
        (lo, hi), = sl.ranges
        return [(0, 0, rows)], rows, hi - lo, lo
    if sl.dim != len(shape) - 2:
        raise TPError(f"{where(sl.name, shape, sl.dim)}: a quantized matrix is cut by its rows or columns only")
    out, at = [], 0
    for lo, hi in sl.ranges:
        if hi > lo:
            out.append((at, lo, hi - lo))
            at += hi - lo
    return out, at, cols, 0


def kept_segments(spec: TensorSpec, sl: Slice, step: int) -> Iterator[tuple[int, int, dict]]:
    """(lo, hi, piece fields) of a kept tensor's slice, in local order, each at most ``step``
    bytes: a run of rows of one part as one strided piece (``stride``: the file's row bytes),
    else contiguous ranges. ``at``: where the piece lands in the local tensor's bytes."""
    size = spec.itemsize
    runs = strided_ranges(spec.start, spec.shape, size, sl)
    if len(runs) == 1 and runs[0].count > 1 and runs[0].length < runs[0].stride:
        r = runs[0]
        if r.length > step:                   # a row longer than a slot: contiguous parts of it
            for k in range(r.count):
                a = r.first_lo + k * r.stride
                for lo in range(a, a + r.length, step):
                    yield lo, min(lo + step, a + r.length), {"at": k * r.length + lo - a}
            return
        per = max(1, step // r.length)
        for k0 in range(0, r.count, per):
            n = min(per, r.count - k0)
            lo = r.first_lo + k0 * r.stride
            yield lo, lo + (n - 1) * r.stride + r.length, {
                "at": k0 * r.length, "stride": r.stride if n > 1 else 0, "row0": 0, "row1": n, "col0": 0,
                "col1": r.length // size}
        return
    at, any_ = 0, False
    for a, b in byte_ranges(spec.start, spec.shape, size, sl):
        for lo in range(a, b, step):
            any_ = True
            yield lo, min(lo + step, b), {"at": at + lo - a}
        at += b - a
    if not any_:                              # an empty slice still finishes its tensor
        yield spec.start, spec.start, {"at": 0}
