"""What load_into needs to know about a model beyond its parameter names (transformers, torch).

* :class:`Renamer`: transformers 5 models hold some tensors under other names than their
  checkpoints (Mixtral's ``block_sparse_moe`` is ``mlp``) and fuse per-expert MoE weights
  (``experts.<i>.w1`` / ``w3`` -> one ``experts.gate_up_proj`` ``[E, 2I, H]``). transformers says how
  in the model's own conversion mapping; the Renamer applies it to the stream: renamed tensors pass
  at once, the pieces of a fused tensor wait (as FP8, they are small) until the last arrives and
  are then joined with transformers' own operations, dequantized into ``dtype`` (a fused experts
  module has no FP8 forward).
* :func:`weights_read_directly`: Linear modules whose parent reads ``.weight`` itself (Mamba's
  ``dt_proj.weight @ x``, T5's ``wo.weight.dtype``): an ``FP8Linear`` there would hand the parent
  FP8 codes, so load_into keeps them in high precision.
"""

from __future__ import annotations

import inspect
import re

import torch
from torch import nn

from .result import QuantizedTensor

__all__ = ["Renamer", "weights_read_directly"]


def _natural(name: str) -> tuple:
    """experts.2 before experts.10."""
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name))


class Renamer:
    """``feed(name, tensor)`` -> ``[(model name, tensor), ...]`` (empty while a fused tensor is
    incomplete). Identity for a model without a conversion mapping or without transformers."""

    def __init__(self, model: nn.Module, names: list[str], dtype: torch.dtype):
        self.model, self.dtype = model, dtype
        self._renamed: dict[str, str] = {}
        self._fused: dict[str, tuple[str, object, str]] = {}   # source -> (target, converter, pattern)
        self._waiting: dict[str, dict[str, QuantizedTensor | torch.Tensor]] = {}
        self._need: dict[str, int] = {}
        try:
            from transformers.conversion_mapping import get_model_conversion_mapping
            from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key
            mapping = get_model_conversion_mapping(model)
        except Exception:  # noqa: BLE001 - no transformers, or not a transformers model: names as they are
            return
        renamings = [t for t in mapping if isinstance(t, WeightRenaming)]
        converters = [t for t in mapping if isinstance(t, WeightConverter)]
        for name in names:
            key, pattern = rename_source_key(name, renamings, converters)
            if pattern is not None:
                conv = next(c for c in converters if pattern in c.source_patterns)
                self._fused[name] = (key, conv, pattern)
                self._need[key] = self._need.get(key, 0) + 1
            elif key != name:
                self._renamed[name] = key

    def feed(self, name: str, t) -> list[tuple[str, torch.Tensor | QuantizedTensor]]:
        if name not in self._fused:
            return [(self._renamed.get(name, name), t)]
        key, conv, _ = self._fused[name]
        waiting = self._waiting.setdefault(key, {})
        waiting[name] = t
        if len(waiting) < self._need[key]:
            return []
        del self._waiting[key]
        return [(key, self._join(key, conv, waiting))]

    def _join(self, key: str, conv, parts: dict) -> torch.Tensor:
        by_pattern: dict[str, list[torch.Tensor]] = {p: [] for p in conv.source_patterns}
        for src in sorted(parts, key=_natural):
            t = parts.pop(src)
            t = t.dequantize(self.dtype) if isinstance(t, QuantizedTensor) else t.to(self.dtype)
            by_pattern[self._fused[src][2]].append(t)
        out = {p: ts for p, ts in by_pattern.items() if ts}
        for op in conv.operations:   # transformers' own MergeModulelist / Concatenate / ...
            out = op.convert(out, source_patterns=conv.source_patterns, target_patterns=conv.target_patterns,
                             full_layer_name=key, model=self.model, config=getattr(self.model, "config", None))
        (fused,) = out.values()
        return fused

    def leftover(self) -> list[str]:
        """Sources of fused tensors that never completed (the stream was cut short)."""
        return sorted(n for w in self._waiting.values() for n in w)


_SELF_WEIGHT = re.compile(r"self\.(\w+)\.weight\b")
_SOURCE: dict[type, set[str]] = {}


def _children_read(cls: type) -> set[str]:
    """Names ``x`` in ``self.x.weight`` in the methods of ``cls`` (not in its init code)."""
    if cls not in _SOURCE:
        found: set[str] = set()
        for klass in cls.__mro__:
            if klass in (nn.Module, object):
                break
            for attr, fn in vars(klass).items():
                if "init" in attr or not callable(fn):
                    continue
                try:
                    found.update(_SELF_WEIGHT.findall(inspect.getsource(fn)))
                except (OSError, TypeError):   # built-ins, C extensions, source not shipped
                    continue
        _SOURCE[cls] = found
    return _SOURCE[cls]


def weights_read_directly(model: nn.Module) -> list[str]:
    """Module names of the ``nn.Linear`` children whose parent's code reads ``.weight`` itself."""
    out = []
    for pname, parent in model.named_modules():
        read = _children_read(type(parent))
        for cname, child in parent.named_children():
            if isinstance(child, nn.Linear) and cname in read:
                out.append(f"{pname}.{cname}" if pname else cname)
    return out
