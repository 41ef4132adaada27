"""Which tensors become FP8: one policy for every verb, module-aware where it can be.

Engines quantize the weights of ``nn.Linear`` modules and fused MoE expert tensors (vLLM,
llm-compressor and transformers' compressed-tensors loader; one scale per expert), and keep in
high precision embeddings, ``lm_head``, norms, convolutions, MoE routers and a model's
``_keep_in_fp32_modules``. A name alone cannot tell which module owns a tensor (GPT-2's
``Conv1D`` weights look like Linear weights but are stored ``[in, out]``; T5's ``shared`` and
GPT-2's ``wte`` are embeddings), so a :class:`Policy` decides in this order:

1. structure: only floating tensors (F64/F32/F16/BF16) of rank >= 2 with elements are candidates;
2. ``skip`` (tensor-name patterns: glob, or a plain substring), then ``ignore`` (compressed-tensors
   style: a module name, ``"re:<regex>"`` matched at the start of the module name, or a module class
   name such as ``"Linear"`` or ``"Embedding"``) keep a tensor; ``targets`` (same patterns), when
   given, quantizes exactly the candidates it matches;
3. the module that owns the tensor, in the model built on the ``meta`` device from config.json
   (only when the checkpoint folder has one and transformers is importable: no weight is read or
   allocated) or the module passed to ``load_into``;
4. otherwise (no skeleton, or a name the skeleton lacks, e.g. per-expert MoE weights that
   transformers fuses in memory) the name-and-shape rule of :func:`_by_name`.

Each :class:`Decision` carries the rule that made it (``inspect`` prints it) and the module kind,
which ``convert`` needs for the ``ignore`` list of its ``quantization_config``.
"""

from __future__ import annotations

import fnmatch
import functools
import re
from dataclasses import dataclass
from typing import Callable


from .checkpoint import TensorSpec
from .dtypes import WIDE_FLOATS
from .foreign import QuantizedSourceError
from .skeleton import Skeleton

__all__ = ["Decision", "Policy", "matches_module", "LINEAR", "EXPERTS", "OTHER", "CONV1D",
           "FLOAT_DTYPES", "QuantizedSourceError"]

LINEAR, EXPERTS, OTHER = "linear", "experts", "other"   # Decision.kind
# GPT-2's Conv1D: kept (stored [in, out]), but engines build Linear layers for it (vLLM's GPT-2 /
# GPTBigCode: QKVParallelLinear, Column/RowParallelLinear), so a converted checkpoint must ignore it
CONV1D = "conv1d"
FLOAT_DTYPES = WIDE_FLOATS   # floats wider than FP8: the only dtypes worth quantizing
# MoE routers are kept by vLLM (its gate is a ReplicatedLinear built without quant_config) and by
# llm-compressor's recipes; their outputs pick experts, so FP8 noise there changes which run.
_ROUTERS = frozenset({"gate", "router", "shared_expert_gate"})
_EMBEDDINGS = frozenset({"wte", "wpe", "shared", "embeddings", "word_embeddings", "tok_embeddings",
                         "position_embeddings", "token_type_embeddings", "relative_attention_bias"})
_CONV1D = frozenset({"c_attn", "c_proj", "c_fc", "q_attn"})   # GPT-2 family names of Conv1D
_FUSED_EXPERTS = ("experts",)
# LM heads under other names: Meta / Mistral native "output", GPT-NeoX "embed_out", ChatGLM "output_layer"
_HEADS = frozenset({"lm_head", "output", "embed_out", "output_layer"})
# what a kept module is, from its class name, for the rule inspect prints
_KEPT_CLASSES = (("Embedding", "embedding"), ("Norm", "norm"), ("Conv1D", "GPT-2 Conv1D, stored [in, out]"),
                 ("Conv", "convolution"), ("Router", "MoE router"), ("Gate", "MoE router"))


@dataclass(frozen=True)
class Decision:
    """``quantize``: becomes FP8. ``rule``: why, in words. ``kind``: LINEAR for the weight of a
    Linear(-like) module, EXPERTS for a fused ``[E, rows, cols]`` expert tensor, CONV1D for a GPT-2
    Conv1D weight (kept; a Linear to engines), OTHER else."""

    quantize: bool
    rule: str
    kind: str = OTHER


def _module_of(name: str) -> str:
    return name.rpartition(".")[0]


def matches_module(module: str, pattern: str, classes: tuple[str, ...] = ()) -> bool:
    """compressed-tensors' matching: ``re:`` + a regex matched at the start of the module name,
    else the exact module name or a class name of the module (``classes``: its MRO names)."""
    if pattern.startswith("re:"):
        return re.match(pattern[3:], module) is not None
    return pattern == module or pattern in classes


def _skip_matches(name: str, pattern: str) -> bool:
    # a pattern with glob characters matches the whole tensor name; a plain one is a substring
    if any(c in pattern for c in "*?["):
        return fnmatch.fnmatchcase(name, pattern)
    return pattern in name


def _is_router(module: str) -> bool:
    """``mlp.gate``, ``mlp.router``, and a Linear inside a router (JetMoe / DBRX / Granite ``router.layer``)."""
    parts = module.split(".")
    return parts[-1] in _ROUTERS or "router" in parts


_RANK = {}   # rank -> the Decision of a rank >= 3 tensor that is no fused expert stack (shared)
_NAME_RULES = {k: Decision(*v) for k, v in {   # shared: one object per verdict, not per tensor
    "experts": (True, "name rule: fused experts", EXPERTS), "attr": (False, "name rule: not a .weight"),
    "embed": (False, "name rule: embedding"), "lm_head": (False, "name rule: lm_head (output embeddings)", LINEAR),
    "norm": (False, "name rule: norm"), "router": (False, "name rule: MoE router", LINEAR),
    "conv1d": (False, "name rule: GPT-2 Conv1D ([in, out], not a Linear)", CONV1D),
    "linear": (True, "name rule: Linear weight", LINEAR)}.items()}



def _by_name(spec: TensorSpec) -> Decision:
    """The rule without a model: a 2-D ``<module>.weight`` is a Linear weight unless the module's
    name says embedding (``embed``, ``wte``, ``wpe``, ``shared``, ...), LM head (``lm_head``,
    ``output``, ``embed_out``, ``output_layer``), norm (``norm``, ``ln_*``), MoE router (``gate``,
    ``router``, anything inside a ``router``) or GPT-2 ``Conv1D`` (``c_attn``, ``c_proj``,
    ``c_fc``); a rank-3 tensor directly under an ``experts`` module is a fused expert stack."""
    module, _, attr = spec.name.rpartition(".")
    last = module.rpartition(".")[2]
    low = module.lower()
    if len(spec.shape) >= 3:
        if last in _FUSED_EXPERTS and not attr.endswith("bias") and not attr.endswith("scale"):
            return _NAME_RULES["experts"]
        n = len(spec.shape)
        return _RANK.get(n) or _RANK.setdefault(n, Decision(False, f"name rule: rank {n} (convolution or other)"))
    if attr != "weight":
        return _NAME_RULES["attr"]
    if "lm_head" in low or last in _HEADS:
        return _NAME_RULES["lm_head"]
    if "embed" in low or last in _EMBEDDINGS:
        return _NAME_RULES["embed"]
    if "norm" in low or last.startswith("ln_") or last == "ln":
        return _NAME_RULES["norm"]
    if _is_router(module):
        return _NAME_RULES["router"]
    if last in _CONV1D:
        return _NAME_RULES["conv1d"]
    return _NAME_RULES["linear"]


class _Judge:
    """Decisions by the module that owns a tensor in a :class:`Skeleton`."""

    def __init__(self, skeleton: Skeleton):
        self.sk = skeleton

    def resolve(self, name: str) -> str | None:
        """The skeleton's name for a checkpoint name: as is, or with / without the prefix."""
        cands, prefix = [name], self.sk.prefix
        if prefix:
            p = prefix + "."
            cands.append(name[len(p):] if name.startswith(p) else p + name)
        return next((c for c in cands if c in self.sk.params), None)

    def classes(self, name: str) -> tuple[str, ...]:
        """Class names (MRO) of the module owning the checkpoint tensor ``name``; () if unknown."""
        key = self.resolve(name)
        return self.sk.modules.get(_module_of(key), ()) if key is not None else ()

    def _kept_fp32(self, module: str) -> str | None:
        parts = module.split(".")
        return next((k for k in self.sk.keep_fp32 if k in parts or module.endswith("." + k)), None)

    def decide(self, spec: TensorSpec) -> Decision | None:
        key = self.resolve(spec.name)
        if key is None or self.sk.params[key] != spec.shape:
            return None   # not this model's tensor (or a differently shaped one): the name rule
        module, _, attr = key.rpartition(".")
        cls = self.sk.modules[module][0]
        rule = lambda what: f"{self.sk.source}: {what} ({cls})"  # noqa: E731
        if module in self.sk.linear:
            if attr != "weight":
                return Decision(False, rule(attr))
            if (k := self._kept_fp32(module)) is not None:
                return Decision(False, rule(f"in _keep_in_fp32_modules {k!r}"), LINEAR)
            if module in self.sk.heads:
                return Decision(False, rule("lm_head, output embeddings"), LINEAR)
            if _is_router(module):
                return Decision(False, rule("MoE router"), LINEAR)
            return Decision(True, rule("Linear weight"), LINEAR)
        if len(spec.shape) >= 3 and ("Expert" in cls or module.rpartition(".")[2] in _FUSED_EXPERTS):
            return Decision(True, rule("fused experts"), EXPERTS)
        return Decision(False, rule(next((k for part, k in _KEPT_CLASSES if part in cls), "not a Linear")),
                        CONV1D if "Conv1D" in cls and attr == "weight" else OTHER)


@functools.lru_cache(maxsize=None)
def _kept(rule: str, kind: str) -> Decision:
    """A shared Decision to keep a tensor (millions of small tensors share a handful)."""
    return Decision(False, rule, kind)


class Policy:
    """``policy(spec) -> bool`` (quantize?) and ``policy.decide(spec) -> Decision``; built by
    :func:`policy_for`. ``source`` names the model the decisions came from, or the name rule."""

    def __init__(self, skeleton: Skeleton | None, source: str, *, skip=(), ignore=(), targets=None,
                 config: dict | None = None, veto: Callable[[TensorSpec, Decision], str | None] | None = None):
        self._skeleton, self.source, self.config = skeleton, source, config
        self._judge = _Judge(skeleton) if skeleton is not None else None
        self._skip, self._ignore, self._targets = tuple(skip), tuple(ignore), targets
        self._veto = veto   # see narrowed()
        self._cache: dict[str, Decision] = {}

    def __call__(self, spec: TensorSpec) -> bool:
        return self.decide(spec).quantize

    def decide(self, spec: TensorSpec) -> Decision:
        d = self._cache.get(spec.name)
        if d is None:
            d = self._decide(spec)
            why = self._veto(spec, d) if self._veto is not None and d.quantize else None
            if why is not None:
                d = Decision(False, why, d.kind)
            self._cache[spec.name] = d
        return d

    def _decide(self, spec: TensorSpec) -> Decision:
        # the module's kind comes first (convert's ignore list needs it for every tensor), then
        # structure, then the options, then the module's (or the name rule's) verdict
        base = (self._judge.decide(spec) if self._judge else None) or _by_name(spec)
        if spec.dtype not in FLOAT_DTYPES:
            return _kept(f"{spec.dtype} (not a float to quantize)", base.kind)
        if len(spec.shape) < 2 or spec.numel == 0:
            return _kept("rank < 2 (norms, biases, vectors)" if len(spec.shape) < 2 else "no elements", base.kind)
        if any(_skip_matches(spec.name, p) for p in self._skip):
            return Decision(False, "skip option", base.kind)
        if any(self.matches(spec, p, base.kind) for p in self._ignore):
            return Decision(False, "ignore option", base.kind)
        if self._targets is not None:
            if any(self.matches(spec, p, base.kind) for p in self._targets):
                return Decision(True, "targets option", base.kind)
            return Decision(False, "not in targets", base.kind)
        return base

    def matches(self, spec: TensorSpec, pattern: str, kind: str) -> bool:
        """An ``ignore`` / ``targets`` pattern against the tensor's module (name, ``re:``, class
        name) or its full name; the name rule's Linear weights (``kind``) match "Linear" too."""
        classes = self._judge.classes(spec.name) if self._judge else ()
        if kind == LINEAR and "Linear" not in classes:
            classes += ("Linear",)
        return matches_module(_module_of(spec.name), pattern, classes) or pattern == spec.name

    def narrowed(self, veto: Callable[[TensorSpec, Decision], str | None]) -> "Policy":
        """This policy, but a tensor it quantizes is kept where ``veto(spec, decision)`` gives a
        reason (the new rule); for convert, whose formats cannot describe every FP8 tensor."""
        return Policy(self._skeleton, self.source, skip=self._skip, ignore=self._ignore,
                      targets=self._targets, config=self.config, veto=veto)

    def linear_modules(self) -> list[str]:
        """The model's Linear modules (empty without a skeleton): a tied or absent weight too."""
        return sorted(self._skeleton.linear) if self._skeleton is not None else []

    @property
    def prefix(self) -> str:
        """The model's base_model_prefix ("" without a model)."""
        return self._skeleton.prefix if self._skeleton is not None else ""
