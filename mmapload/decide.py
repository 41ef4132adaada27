"""Which policy (policy.py) decides a checkpoint's tensors: a model given by the caller, the model
of config.json built by transformers on meta (in this process or a child, skeleton.py), or the
name rule; checked against the checkpoint (a config of another model falls back to the names,
with a warning) and against the options (a ``skip`` / ``ignore`` / ``targets`` pattern that
matches nothing is said). ``policy_soon`` lets a load start on the name rule while the child
still builds the model.
"""

from __future__ import annotations

from typing import Callable

import torch

from .checkpoint import Checkpoint
from .errors import OptionsError, warn
from .foreign import read_config, refuse_other_methods
from .policy import FLOAT_DTYPES, Policy, _Judge, _skip_matches
from .skeleton import Skeleton, describe, start

__all__ = ["policy_for", "policy_soon", "first_difference"]


def policy_for(ckpt: Checkpoint, opts, module: torch.nn.Module | None = None) -> Policy:
    """The policy of ``ckpt`` under ``opts`` (LoadOptions: ``policy``, ``skip``, ``ignore``,
    ``targets``). ``module``: a model to judge by (load_into passes its own), else with
    ``opts.policy`` "auto" the model of the checkpoint's config.json when transformers can build
    it, "model" the same but an ``OptionsError`` when it cannot, "names" the name rule alone.

    Raises ``QuantizedSourceError`` for a checkpoint quantized by another method (GPTQ, AWQ,
    bitsandbytes, int / NVFP4 compressed-tensors, ...): its packed weights are no floats."""
    policy, later = policy_soon(ckpt, opts, module)
    return later() if later is not None else policy


def policy_soon(ckpt: Checkpoint, opts, module: torch.nn.Module | None = None
                ) -> tuple[Policy, Callable[[], Policy] | None]:
    """``(policy, None)`` as :func:`policy_for` when it is had without waiting, else ``(guess,
    later)``: the model of config.json is being built in a child process (seconds: importing
    transformers), ``guess`` is the name rule, and ``later()`` waits for the child and returns
    policy_for's policy. A load may run on the guess meanwhile and check, with
    :func:`first_difference`, that the policy decides the same (Llama-like models do), else load
    again. ``later.cancel()`` stops the child. Same errors as policy_for (the child's: from later)."""
    cfg = read_config(ckpt.root)
    refuse_other_methods(ckpt, cfg)
    kw = dict(skip=opts.skip, ignore=opts.ignore, targets=opts.targets, config=cfg)
    if module is not None:
        return Policy(describe(module), type(module).__name__, **kw), None
    if opts.policy == "names":
        return _warn_unmatched(Policy(None, "name rule (policy='names')", **kw), ckpt), None
    if cfg is None:
        beside = ckpt.root.parent / "config.json"
        if not ckpt.root.is_dir() and beside.is_file():   # a file given, its model's config.json next to it
            warn(f"{ckpt.root}: a file is loaded alone, without the config.json beside it: its tensors are "
                 "judged by their names, and convert writes no config.json or quantization_config; pass "
                 f"the folder {ckpt.root.parent} to load the model")
            return _settle(ckpt, opts, kw, None, "name rule (a file alone: its folder's config.json unread)"), None
        return _settle(ckpt, opts, kw, None, "name rule (no config.json)"), None
    pending = start(ckpt.root, cfg)
    if pending.ready() or opts.policy == "model":   # "model" never loads on the name rule
        return _settle(ckpt, opts, kw, *pending.result()), None

    def later() -> Policy:
        return _settle(ckpt, opts, kw, *pending.result())
    later.cancel, later.ready = pending.cancel, pending.ready
    return Policy(None, "name rule (guess while config.json's model is built)", **kw), later


def first_difference(a: Policy, b: Policy, ckpt: Checkpoint) -> str | None:
    """The first tensor of ``ckpt`` that ``a`` and ``b`` load differently (quantized or not, or
    of another kind: the plan and convert's layout follow both), in words; None if none does."""
    for spec in ckpt.tensors:
        da, db = a.decide(spec), b.decide(spec)
        if (da.quantize, da.kind) != (db.quantize, db.kind):
            return f"{spec.name!r}: {a.source}: {da.rule}; {b.source}: {db.rule}"
    return None


def _settle(ckpt: Checkpoint, opts, kw: dict, skeleton: Skeleton | None, source: str) -> Policy:
    if skeleton is not None and (why := _mismatch(ckpt, skeleton)):
        skeleton, source = None, f"name rule (config.json's {skeleton.source} {why})"
        if opts.policy == "auto":
            warn(f"{ckpt.root}: {source}")
    if skeleton is None and opts.policy == "model":
        raise OptionsError(f"{ckpt.root}: policy='model' needs a model to judge tensors by, but: "
                           f"{source}; pass policy='auto' to fall back to the name rule")
    return _warn_unmatched(Policy(skeleton, source, **kw), ckpt)


def _warn_unmatched(policy: Policy, ckpt: Checkpoint) -> Policy:
    """A ``skip`` / ``targets`` / ``ignore`` pattern that matches nothing is most likely a typo: say so."""
    for p in policy._skip:   # tensor-name patterns: any tensor counts
        if not any(_skip_matches(s.name, p) for s in ckpt.tensors):
            warn(f"{ckpt.root}: skip pattern {p!r} matches no tensor name of the checkpoint (a glob, "
                          "or a substring of the name)")
    patterns = [("targets", p) for p in policy._targets or ()] + [("ignore", p) for p in policy._ignore]
    if patterns:
        seen = [(s, policy.decide(s).kind) for s in ckpt.tensors if s.dtype in FLOAT_DTYPES and len(s.shape) >= 2]
        for option, p in patterns:
            if not any(policy.matches(s, p, kind) for s, kind in seen):
                warn(f"{ckpt.root}: {option} pattern {p!r} matches no tensor of the checkpoint "
                              "(module names, 're:' + a regex from the start of the name, or class names "
                              "such as 'Linear')")
    return policy


def _mismatch(ckpt: Checkpoint, skeleton: Skeleton) -> str | None:
    """Why config.json's model does not describe these tensors (None if it does): a name of
    the model is in the checkpoint with another shape (a config of another size), or the
    checkpoint holds fewer than half of the model's parameters (another model; per-expert MoE
    checkpoints of transformers' fused experts still hold most of them)."""
    judge, found = _Judge(skeleton), set()
    for spec in ckpt.tensors:
        key = judge.resolve(spec.name)
        if key is not None and skeleton.params[key] != spec.shape:
            return (f"expects {key!r} of shape {list(skeleton.params[key])}, the checkpoint holds "
                    f"{list(spec.shape)}: the config describes another model")
        if key is not None:
            found.add(key)
    if 2 * len(found) < len(skeleton.params):
        return (f"has {len(found)} of its {len(skeleton.params)} parameters in the checkpoint: the config "
                "describes another model")
    return None
