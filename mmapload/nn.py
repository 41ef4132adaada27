"""FP8 modules for torch, and ``load_into``: stream a checkpoint into a model built on ``meta``.

    with torch.device("meta"):
        model = AutoModel.from_config(AutoConfig.from_pretrained(path))
    load_into(model, path, "cuda:0", granularity="block")   # quantized nn.Linear -> FP8Linear

Every tensor arrives from ``iter_quantized`` one at a time and is placed as it lands: host
and device peaks stay within the streaming contract (no full-precision copy of the model).
"""

from __future__ import annotations

import re

import torch
from torch import nn
from torch.nn import functional as F

from .errors import CheckpointError
from .fp8 import FP8_DTYPES, Granularity, as_scheme, check_fp8_dtype, dequantize, fp8_max
from .result import QuantizedTensor
from .hf import Renamer, weights_read_directly
from .config import RING_BYTES, LoadConfig, config_from, public_verb
from .stream import prepare, results

__all__ = ["FP8Linear", "load_into", "ModuleMismatchError"]


class ModuleMismatchError(CheckpointError):
    """The checkpoint does not fit the module: missing or unexpected names, wrong shapes."""


def _device_has_fp8_matmul(device: torch.device) -> bool:
    return (device.type == "cuda" and torch.cuda.is_available()
            and torch.cuda.get_device_capability(device) >= (8, 9))


class FP8Linear(nn.Module):
    """``y = x @ (weight * weight_scale).T + bias`` with an FP8 ``weight`` buffer ``[out, in]``
    and its float32 ``weight_scale`` (``[]`` tensor, ``[out, 1]`` channel, block grid).

    ``forward`` dequantizes the weight into ``x.dtype`` per call (any device), or, where the
    device multiplies FP8 (CUDA sm89+; ``use_scaled_mm=None`` decides by capability), runs
    ``torch._scaled_mm`` on the FP8 weight with ``x`` quantized on the fly (per tensor for a
    per-tensor weight, per row for a per-channel weight with bfloat16 input); blocks always
    dequantize. The state dict holds ``weight``, ``weight_scale`` and ``bias``.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 granularity="tensor", block_size=(128, 128), fp8_dtype=torch.float8_e4m3fn,
                 device=None, bias_dtype=torch.float32, use_scaled_mm: bool | None = None):
        super().__init__()
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.scheme = as_scheme(granularity, block_size)   # PerTensor / PerChannel / PerBlock
        self.granularity = self.scheme.granularity
        self.block_size = getattr(self.scheme, "block", None) or tuple(int(b) for b in block_size)
        self.use_scaled_mm = use_scaled_mm
        shape = (self.out_features, self.in_features)
        self.register_buffer("weight", torch.empty(shape, dtype=check_fp8_dtype(fp8_dtype), device=device))
        self.register_buffer("weight_scale", torch.ones(self.scheme.scale_shape(shape),
                                                        dtype=torch.float32, device=device))
        self.bias = nn.Parameter(torch.zeros(self.out_features, dtype=bias_dtype, device=device),
                                 requires_grad=False) if bias else None

    @classmethod
    def from_quantized(cls, q: QuantizedTensor, bias: torch.Tensor | None = None,
                       use_scaled_mm: bool | None = None) -> "FP8Linear":
        """Wrap ``q`` (no copy); ``bias`` may be a real or a ``meta`` tensor (set later)."""
        if q.data.dim() != 2:
            raise ModuleMismatchError(f"FP8Linear needs a 2-D weight, got {list(q.shape)}")
        out, inp = q.shape
        m = cls(inp, out, bias=False, granularity=q.granularity, block_size=q.block_size,
                fp8_dtype=q.data.dtype, device="meta", use_scaled_mm=use_scaled_mm)
        m.weight, m.weight_scale = q.data, q.scale.reshape(m.weight_scale.shape)
        if bias is not None:
            m.bias = bias if isinstance(bias, nn.Parameter) else nn.Parameter(bias, requires_grad=False)
        return m

    def dequantized_weight(self, dtype=torch.float32) -> torch.Tensor:
        return dequantize(self.weight, self.weight_scale, self.scheme, dtype=dtype)

    def _scaled_mm_ok(self, x: torch.Tensor) -> bool:
        use = self.use_scaled_mm
        if use is None:
            use = _device_has_fp8_matmul(x.device)
        if not use or self.weight.dtype is not torch.float8_e4m3fn or x.dtype not in (
                torch.float16, torch.bfloat16, torch.float32):
            return False
        if self.in_features % 16 or self.out_features % 16:
            return False
        return self.granularity is Granularity.TENSOR or (
            self.granularity is Granularity.CHANNEL and x.dtype is torch.bfloat16)

    def _forward_scaled_mm(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)
        per_row = self.granularity is Granularity.CHANNEL
        amax = x2.abs().amax(dim=1, keepdim=True) if per_row else x2.abs().amax()
        fmax = fp8_max(self.weight.dtype)
        sx = torch.where(amax == 0, torch.ones_like(amax), amax.float() / fmax)
        xq = (x2.float() / sx).clamp_(-fmax, fmax).to(self.weight.dtype)
        sw = self.weight_scale.reshape(1, -1) if per_row else self.weight_scale.reshape(())
        bias = None if self.bias is None else self.bias.to(x.dtype)
        fused = bias is not None and x.dtype is not torch.float32   # _scaled_mm: no bias with fp32 out
        y = torch._scaled_mm(xq, self.weight.t(), scale_a=sx.float(), scale_b=sw.float(),
                             bias=bias if fused else None, out_dtype=x.dtype)
        if bias is not None and not fused:
            y = y + bias
        return y.reshape(*x.shape[:-1], self.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._scaled_mm_ok(x):
            return self._forward_scaled_mm(x)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantized_weight(x.dtype), bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, fp8={self.weight.dtype}, granularity={self.granularity.value}")


def _targets(module: nn.Module) -> dict[str, list[tuple[nn.Module, str]]]:
    """Every parameter / buffer name (aliases of a tied tensor included) -> all of its slots
    (owning module, attribute), the slots of its aliases too."""
    slots: dict[int, list[tuple[nn.Module, str]]] = {}
    names: dict[str, int] = {}
    for mname, mod in module.named_modules(remove_duplicate=False):
        for kind in (mod._parameters, mod._buffers):
            for attr, t in kind.items():
                if t is None:
                    continue
                slots.setdefault(id(t), []).append((mod, attr))
                names[f"{mname}.{attr}" if mname else attr] = id(t)
    return {n: slots[i] for n, i in names.items()}


def _resolve(name: str, targets, prefix: str) -> str | None:
    cands = [name]
    if prefix:
        p = prefix + "."
        cands.append(name[len(p):] if name.startswith(p) else p + name)
    return next((c for c in cands if c in targets), None)


def _held(mod: nn.Module, attr: str) -> dict:
    """The dict (parameters or buffers) of ``mod`` that holds ``attr``."""
    return mod._parameters if attr in mod._parameters else mod._buffers


def _place(slots, t: torch.Tensor, name: str, src: str) -> None:
    mod, attr = slots[0]
    old = _held(mod, attr).get(attr)
    if tuple(old.shape) != tuple(t.shape):
        raise ModuleMismatchError(f"{src}: tensor {name!r} has shape {list(t.shape)}, the module expects "
                                  f"{list(old.shape)}")
    if t.dtype in FP8_DTYPES and old.dtype not in FP8_DTYPES:
        raise ModuleMismatchError(f"{src}: tensor {name!r} is FP8 without a scale, so its values are unknown "
                                  "to a high-precision parameter: pass fp8_weight_scale=S (the scale it was "
                                  "stored with) or load a checkpoint that has its scales")
    if t.is_floating_point() and old.is_floating_point() and t.dtype != old.dtype:
        t = t.to(old.dtype)   # the module's declared dtype wins, as in from_pretrained
    new = nn.Parameter(t, requires_grad=False) if isinstance(old, nn.Parameter) else t
    for m, a in slots:
        _held(m, a)[a] = new


def _swap_linear(root: nn.Module, mname: str, q: QuantizedTensor, use_scaled_mm, src: str) -> nn.Module:
    lin = root.get_submodule(mname)
    if tuple(lin.weight.shape) != tuple(q.shape):
        raise ModuleMismatchError(f"{src}: tensor {mname + '.weight'!r} has shape {list(q.shape)}, the "
                                  f"module expects {list(lin.weight.shape)}")
    new = FP8Linear.from_quantized(q, lin.bias, use_scaled_mm)
    parent, _, child = mname.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, new)
    return new


@public_verb
def load_into(module: nn.Module, path, device="cpu", *, use_scaled_mm: bool | None = None,
              ring_bytes: int = RING_BYTES, fp8_dtype=torch.float8_e4m3fn, granularity="tensor",
              block_size=(128, 128), scale_dtype: str = "float32", skip=(), ignore=(), targets=None,
              policy: str = "auto",
              fp8_weight_scale: float | None = None, progress: bool = False, drop_page_cache: bool = True,
              error_stats: bool = False, keep_partial: bool = False, io: str = "mmap",
              read_threads: int | None = None,
              tp_size: int = 1, tp_rank: int | None = None, process_group=None, tp_plan=None,
              tp_timeout: float = 300.0) -> nn.Module:
    """Materialize ``module`` (built on the ``meta`` device, or partly so) from the checkpoint
    ``path``, streamed as ``iter_quantized`` streams it; returns ``module``.

    What is quantized is decided by ``module`` itself (policy.py): the weights of its
    ``nn.Linear`` modules, except its ``_keep_in_fp32_modules``, MoE routers, output
    embeddings and Linears whose parent reads ``.weight`` itself (hf.weights_read_directly, e.g.
    Mamba's ``dt_proj``); ``skip`` / ``ignore`` / ``targets`` options apply on top. A transformers
    model's conversion mapping renames checkpoint names and fuses per-expert MoE weights into
    its fused experts (hf.Renamer; those are dequantized into the model's dtype, since the fused
    experts module has no FP8 forward). Quantized weights of ``nn.Linear`` modules become
    ``FP8Linear`` (swapped in the parent); a quantized weight of any other module is dequantized
    into the module's dtype. Other tensors are set as they are (floating ones cast to the module's
    dtype) as parameters with ``requires_grad=False`` or buffers; tied tensors get one shared
    tensor. Names match exactly, or with / without a leading ``<module.base_model_prefix>.``.

    Tensors not in the checkpoint that are not on ``meta`` stay as they are. Buffers left on ``meta`` (code-made ones like ``token_type_ids``)
    are initialized by a transformers model's own ``initialize_weights()`` (which skips what was
    loaded); anything still on ``meta`` after that is an error naming it.

    Args:
        module (`torch.nn.Module`): the model, built on ``meta`` (or partly so).
        path (`str` or `os.PathLike`): a ``.safetensors`` file, a sharded index, or a folder.
        device (`str` or `torch.device`, default "cpu"): where the tensors land.
        use_scaled_mm (`bool` or None, default None): ``FP8Linear``'s matmul (None: where supported).
        ring_bytes, fp8_dtype, granularity, block_size, scale_dtype, skip, ignore, targets, policy,
            fp8_weight_scale, progress, drop_page_cache, error_stats, keep_partial, io, read_threads,
            tp_size, tp_rank, process_group, tp_plan, tp_timeout:
            the load options, each documented (units, default, errors) on ``mmapload.LoadConfig``.

    Returns:
        `torch.nn.Module`: ``module``, loaded.

    Raises:
        OptionsError: a bad option (naming it), before the module changes.
        ModuleMismatchError: names in the checkpoint that the module lacks, or parameters it does
            not provide (listing them), or shapes that do not fit. Whatever ``iter_quantized`` raises.

    Example:

    ```python
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))
    load_into(model, path, "cuda:0", granularity="block")
    ```
    """
    opts = config_from(locals())   # validates everything before any change
    opts.whole_tensors("load_into", "it fills the module's whole tensors")
    src = str(path)
    prefix = getattr(module, "base_model_prefix", "") or ""
    # judged by this module: its nn.Linear weights become FP8, its _keep_in_fp32_modules stay, and
    # so do Linears whose parent reads .weight itself (an FP8Linear would hand it FP8 codes)
    direct = [f"re:(?:{re.escape(prefix)}\\.)?{re.escape(n)}$" for n in weights_read_directly(module)]
    opts = LoadConfig(**{**opts.as_kwargs(), "ignore": (*opts.ignore, *direct)})
    pipe = prepare(path, device, opts, module=module)
    dtype = next((p.dtype for p in module.parameters() if p.is_floating_point()), torch.float32)
    renamer = Renamer(module, [s.name for s in pipe.ckpt.tensors], dtype)
    stream = results(pipe)
    targets = _targets(module)
    loaded: set[str] = set()
    unexpected: list[str] = []
    try:
        for name, t in ((n, x) for cname, ct in stream for n, x in renamer.feed(cname, ct)):
            key = _resolve(name, targets, prefix)
            if key is None:
                unexpected.append(name)
                continue
            mname, _, attr = key.rpartition(".")
            owner = module.get_submodule(mname)
            if isinstance(t, QuantizedTensor) and isinstance(owner, nn.Linear) and attr == "weight":
                if len(targets[key]) > 1:
                    raise ModuleMismatchError(f"{src}: {name!r} is quantized but tied to another tensor "
                                              f"of the module; keep it in high precision (skip=[{name!r}])")
                new = _swap_linear(module, mname, t, use_scaled_mm, src)
                pre = f"{mname}." if mname else ""
                targets[pre + "weight"] = [(new, "weight")]
                if new.bias is not None:
                    targets[pre + "bias"] = [(new, "bias")]
            else:
                if isinstance(t, QuantizedTensor):
                    t = t.dequantize()
                _place(targets[key], t, name, src)
            loaded.add(key)
            del t
    finally:
        stream.close()
    unexpected += renamer.leftover()
    missing = [n for n, slots in targets.items() if n not in loaded and _is_meta(slots)
               and slots[0][1] in slots[0][0]._parameters]
    if unexpected or missing:
        raise ModuleMismatchError(
            f"{src} does not fit {type(module).__name__}: "
            + (f"{len(unexpected)} checkpoint tensor(s) the module lacks: {unexpected[:20]}" if unexpected else "")
            + ("; " if unexpected and missing else "")
            + (f"{len(missing)} parameter(s) the checkpoint lacks: {missing[:20]}" if missing else "")
            + (f" (tried with and without the prefix {prefix!r})" if prefix else ""))
    _init_meta_buffers(module, targets, loaded, device)
    still = [n for n, s in _targets(module).items() if _is_meta(s)]
    if still:
        raise ModuleMismatchError(f"{src}: {len(still)} tensor(s) of {type(module).__name__} are still on "
                                  f"the meta device after the load (not in the checkpoint): {still[:20]}")
    return module


def _is_meta(slots) -> bool:
    t = _held(*slots[0]).get(slots[0][1])
    return t is not None and t.is_meta


def _init_meta_buffers(module: nn.Module, targets, loaded: set[str], device) -> None:
    """Buffers still on meta: materialize them on ``device`` and let a transformers model's
    ``initialize_weights()`` fill them (it skips tensors flagged ``_is_hf_initialized``)."""
    left = [n for n, s in targets.items() if n not in loaded and _is_meta(s)]
    if not left or not callable(getattr(module, "initialize_weights", None)):
        return
    for t in list(module.parameters()) + list(module.buffers()):
        if not t.is_meta:
            t._is_hf_initialized = True
    for n in left:
        mod, attr = targets[n][0]
        mod._buffers[attr] = torch.empty_like(mod._buffers[attr], device=device)
    module.initialize_weights()
