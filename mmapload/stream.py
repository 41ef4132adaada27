"""The public verbs: checkpoint -> plan -> pipeline (pipeline.py) -> results.

``iter_quantized`` yields ``(name, tensor)`` in file order; ``stream_quantize`` keeps them
in a ``QuantizedModel``. A reader thread (ring.py) fills slots from the maps while the
pipeline's consumer moves each slot to the device, quantizes its pieces and retains only
the FP8 data and scales. No view into a ring slot ever reaches the caller.
"""

from __future__ import annotations

from contextlib import closing
from typing import Callable, Iterator

import torch

from ._procmem import headroom
from .result import Loaded
from .checkpoint import open_checkpoint
from .errors import DeviceError, MmapLoadError, OptionsError
from .config import RING_BYTES, LoadConfig, config_from, public_verb
from .pipeline import Pipeline as _Pipeline
from .prequantized import fp8_pairs, paired, unscaled_fp8
from .decide import first_difference, policy_for, policy_soon
from .policy import LINEAR, Policy
from .result import OutFor, QuantizedModel, flat as _flatten
from .transfer import resolve_device

__all__ = ["stream_quantize", "iter_quantized"]


def prepare(path, device, config: LoadConfig, *, module: torch.nn.Module | None = None,
            narrow: Callable[[Policy], Policy] | None = None) -> _Pipeline:
    """Check device and checkpoint and build the policy and the plan under ``config`` (already
    validated); no data is read yet. ``module``: judge tensors by this model (load_into);
    ``narrow``: adjust the policy (convert keeps what its formats cannot describe)."""
    dev, ckpt = _open(path, device, config)
    policy = policy_for(ckpt, config, module)
    return _Pipeline(ckpt, dev, config, narrow(policy) if narrow else policy)


def _open(path, device, config: LoadConfig):
    if not isinstance(config, LoadConfig):
        raise OptionsError(f"prepare needs a LoadConfig, got {type(config).__name__}")
    return resolve_device(device), open_checkpoint(path)


class Guess:
    """A pipeline planned on the name rule while the model of config.json is still being built in
    a child process (``policy_soon``): the load goes on meanwhile, ``settle`` says whether it stands."""

    def __init__(self, pipe: _Pipeline, later: Callable[[], Policy], narrow: Callable[[Policy], Policy]):
        self.pipe, self._later, self._narrow = pipe, later, narrow
        self.policy: Policy | None = None      # the model's policy, once settled

    def ready(self) -> bool:
        """True when ``settle`` would not wait."""
        return self._later.ready()

    def settle(self) -> bool:
        """Wait for the model's policy (``self.policy``); True when it decides every tensor as the
        guess did (quantized or not, the same kind), so the guess's load is the load (its report
        then names the model), False when it must be loaded again."""
        if self.policy is None:
            self.policy = self._narrow(self._later())
        if first_difference(self.pipe.policy, self.policy, self.pipe.ckpt) is not None:
            return False
        self.pipe.report.policy = self.policy.source
        return True

    def cancel(self) -> None:
        """Stop the child (the load failed or was abandoned)."""
        self._later.cancel()

    def again(self) -> _Pipeline:
        """The load planned anew on the settled model's policy (after ``settle`` said False)."""
        return _Pipeline(self.pipe.ckpt, self.pipe.device, self.pipe.opts, self.policy)


def prepare_soon(path, device, config: LoadConfig, *, narrow: Callable[[Policy], Policy] | None = None
                 ) -> tuple[_Pipeline, Guess | None]:
    """``prepare``, without waiting for the model of config.json when it is built in a child
    process: ``(pipe, None)`` when the policy was had at once (as prepare), else the pipeline of
    the name rule and its ``Guess``. Only for a load whose results are not handed out before
    ``Guess.settle`` (stream_quantize, convert) and without tensor parallelism (every rank must
    plan the same)."""
    if config.tp_size > 1:
        return prepare(path, device, config, narrow=narrow), None
    dev, ckpt = _open(path, device, config)
    fix = narrow or (lambda p: p)
    if room_beside(ckpt, dev, config):
        policy, later = policy_soon(ckpt, config)
    else:   # the child runs first, alone: its memory never adds to the load's
        policy, later = policy_for(ckpt, config), None
    try:
        pipe = _Pipeline(ckpt, dev, config, fix(policy))
    except MmapLoadError:
        if later is None:
            raise
        return _Pipeline(ckpt, dev, config, fix(later())), None   # the guess's error may not be the model's
    except BaseException:
        if later is not None:
            later.cancel()
        raise
    return pipe, (None if later is None else Guess(pipe, later, fix))


CHILD_ROOM = 1 << 30   # what helper processes (each imports torch + transformers: ~0.3-0.4 GiB) may take


def room_beside(ckpt, dev: torch.device, config: LoadConfig) -> bool:
    """Whether helper child processes (the model of config.json, convert's validator) may run
    beside this load: the memory left (``_procmem.headroom``: the host's, or a container's limit's)
    holds the ring, the loaded model when it stays in host RAM (a CPU load), and ``CHILD_ROOM``.
    Else they run before or after it, alone, and a memory-limited container's peak stays the load's."""
    need = config.ring_bytes + (ckpt.total_bytes if dev.type == "cpu" else 0) + CHILD_ROOM
    return headroom() >= need


def stands(guess: Guess | None) -> bool:
    """After an ``MmapLoadError`` in a load planned on ``guess``: True when the error is the model's
    too (re-raise it), False when the model's policy loads otherwise (load again, as GuessedWrong)."""
    return guess is None or guess.settle()


def results(pipe: _Pipeline, flat_: bool = False, out_for: OutFor | None = None) -> Iterator[tuple[str, Loaded]]:
    """The pipeline's ``(name, tensor)`` stream, FP8 pairs of the source joined; ``out_for``: see
    ``Pipeline.run``."""
    run = pipe.run(out_for)
    pairs = fp8_pairs(pipe.ckpt, pipe.policy.config, pipe.opts.block_size)
    scale = pipe.opts.fp8_weight_scale
    unscaled = {} if scale is None else {w.name: float(scale) for w in unscaled_fp8(
        pipe.ckpt, pairs, lambda s: pipe.policy.decide(s).kind == LINEAR)}
    items = paired(run, pairs, pipe.ckpt, unscaled)
    try:
        yield from _flatten(items) if flat_ else items
    finally:
        run.close()   # joins the reader thread now, not when the generator is collected


@public_verb
def iter_quantized(path, device="cpu", *, flat: bool = False, ring_bytes: int = RING_BYTES,
                   fp8_dtype=torch.float8_e4m3fn, granularity="tensor", block_size=(128, 128),
                   scale_dtype: str = "float32", skip=(),
                   ignore=(), targets=None, policy: str = "auto", fp8_weight_scale: float | None = None,
                   progress: bool = False, drop_page_cache: bool = True, error_stats: bool = False,
                   keep_partial: bool = False, io: str = "mmap",
                   read_threads: int | None = None,
                   tp_size: int = 1, tp_rank: int | None = None, process_group=None, tp_plan=None,
                   tp_timeout: float = 300.0) -> Iterator[tuple[str, Loaded]]:
    """Yield ``(name, tensor)`` in file order: ``QuantizedTensor`` for quantized weights,
    the original tensor (on ``device``, bit-identical) for everything else. FP8 weights
    already in the checkpoint, with their ``_scale`` / ``_scale_inv``, come out as one
    ``QuantizedTensor`` (not re-quantized).

    Every dtype safetensors defines passes through. One the installed torch has comes out as
    that torch dtype and the header's shape (F4 as ``float4_e2m1fn_x2`` with the last dim
    halved, as ``safetensors.safe_open`` gives it). One it lacks (F6_E2M3, F6_E3M2) comes out
    as ``torch.uint8`` holding the file's bytes, the last dim scaled to bytes (1-D if it does
    not hold whole bytes): ``checkpoint.TensorSpec.torch_shape`` says which, and the header's
    dtype and shape (``open_checkpoint(path)[name]``) say how to read it. Such tensors are never
    quantized; ``SafetensorsWriter`` takes them back with their header dtype and shape.

    Options and the checkpoint are validated now; reading starts at the first ``next()``.
    Closing the generator early stops the reader thread and frees the ring.

    Args:
        path (`str` or `os.PathLike`): a ``.safetensors`` file, a sharded index, or a folder.
        device (`str` or `torch.device`, default "cpu"): where tensors land ("cpu", "cuda[:N]").
        flat (`bool`, default False): yield plain tensors for engines' weight loaders instead:
            ``("x.weight", fp8)`` followed by ``("x.weight_scale", scale)`` (float32, or the weight's
            dtype with ``scale_dtype="weight"``).
        ring_bytes, fp8_dtype, granularity, block_size, scale_dtype, skip, ignore, targets, policy,
            fp8_weight_scale, progress, drop_page_cache, error_stats, keep_partial, io, read_threads,
            tp_size, tp_rank, process_group, tp_plan, tp_timeout:
            the load options, each documented (units, default, errors) on ``mmapload.LoadConfig``;
            the defaults here are its defaults.

    Returns:
        `Iterator[tuple[str, QuantizedTensor | torch.Tensor]]`: a generator; close it to stop early.

    Raises:
        OptionsError: a bad option (naming it), before any I/O. CheckpointError / HeaderError /
            ShardIndexError: a bad checkpoint. QuantizedSourceError: a checkpoint quantized by
            another method. DeviceError, NonFiniteError, FileChangedError: while streaming.

    Example:

    ```python
    from mmapload import iter_quantized

    for name, t in iter_quantized("path/to/checkpoint", "cuda:0", granularity="channel"):
        print(name, t.shape)
    ```
    """
    if not isinstance(flat, bool):
        raise OptionsError(f"flat must be True or False, got {flat!r}")
    return results(prepare(path, device, config_from(locals())), flat)


@public_verb
def stream_quantize(path, device="cpu", *, ring_bytes: int = RING_BYTES, fp8_dtype=torch.float8_e4m3fn,
                    granularity="tensor", block_size=(128, 128), scale_dtype: str = "float32", skip=(),
                    ignore=(), targets=None,
                    policy: str = "auto", fp8_weight_scale: float | None = None, progress: bool = False,
                    drop_page_cache: bool = True, error_stats: bool = False, keep_partial: bool = False,
                    io: str = "mmap", read_threads: int | None = None,
                    tp_size: int = 1, tp_rank: int | None = None, process_group=None, tp_plan=None,
                    tp_timeout: float = 300.0) -> QuantizedModel:
    """Load a safetensors checkpoint onto ``device``, quantizing weights to FP8 on the way.

    What is quantized is the policy's (policy.py): the weights of the nn.Linear modules and
    fused MoE experts of the model config.json describes (built on meta), else a name rule.
    Where that model is built in a child process (transformers not imported here: seconds), the
    load starts on the name rule meanwhile and is done again only if the model decides otherwise.
    Host memory stays near ``ring_bytes`` plus (on the CPU) what is kept.

    Args:
        path (`str` or `os.PathLike`): a ``.safetensors`` file, a sharded index, or a folder.
        device (`str` or `torch.device`, default "cpu"): where tensors land ("cpu", "cuda[:N]").
        ring_bytes, fp8_dtype, granularity, block_size, scale_dtype, skip, ignore, targets, policy,
            fp8_weight_scale, progress, drop_page_cache, error_stats, keep_partial, io, read_threads,
            tp_size, tp_rank, process_group, tp_plan, tp_timeout:
            the load options, each documented (units, default, errors) on ``mmapload.LoadConfig``;
            the defaults here are its defaults.

    Returns:
        `QuantizedModel`: name -> ``QuantizedTensor`` (``.data`` FP8, ``.scale`` float32 or, with
        ``scale_dtype="weight"``, the weight's dtype) or
        ``torch.Tensor``, with ``.report`` (``LoadReport``).

    Raises:
        OptionsError: a bad option (naming it), before any I/O. CheckpointError / HeaderError /
            ShardIndexError: a bad checkpoint. QuantizedSourceError: a checkpoint quantized by
            another method (GPTQ, AWQ, ...). NonFiniteError: a NaN/Inf weight. DeviceError: out of
            device memory (with ``keep_partial=True`` it carries ``.partial``, a ``QuantizedModel``).

    Example:

    ```python
    from mmapload import stream_quantize

    model = stream_quantize("path/to/checkpoint", "cuda:0", granularity="block", block_size=(128, 128))
    w = model["model.layers.0.mlp.up_proj.weight"]   # QuantizedTensor
    ```
    """
    config = config_from(locals())
    pipe, guess = prepare_soon(path, device, config)
    try:
        tensors = None
        try:
            tensors = _collect(pipe, guess)
        except GuessedWrong:
            pass
        except MmapLoadError:
            if stands(guess):
                raise
        if tensors is None:   # the model's policy decides otherwise: load again on it (outside the
            pipe = guess.again()   # except: the first load's tensors went with its traceback)
            tensors = _collect(pipe, None)
    finally:
        if guess is not None:
            guess.cancel()
    return QuantizedModel(tensors, pipe.report)


class GuessedWrong(Exception):
    """Raised by :func:`watched`: the model's policy decides otherwise than the name rule the load
    was planned on; load again with ``prepare`` (the model is remembered by then)."""


def watched(stream: Iterator, guess: Guess | None) -> Iterator:
    """``stream``, checking ``guess`` as soon as the model's policy is known (and at the end, waiting
    for it): ``GuessedWrong`` when it would load otherwise."""
    for item in stream:
        yield item
        if guess is not None and guess.ready():
            if not guess.settle():
                raise GuessedWrong(first_difference(guess.pipe.policy, guess.policy, guess.pipe.ckpt))
            guess = None
    if guess is not None and not guess.settle():
        raise GuessedWrong(first_difference(guess.pipe.policy, guess.policy, guess.pipe.ckpt))


def _collect(pipe: _Pipeline, guess: Guess | None) -> dict[str, Loaded]:
    """Every tensor of ``pipe``'s load (GuessedWrong as soon as ``guess`` turns out wrong)."""
    tensors: dict[str, Loaded] = {}
    try:
        stream = results(pipe)
        with closing(stream):
            for name, t in watched(stream, guess):
                tensors[name] = t
    except DeviceError as e:
        if pipe.opts.keep_partial:
            e.partial = QuantizedModel(tensors, pipe.report)
        else:   # free what was retained so far
            tensors.clear()
            if pipe.device.type == "cuda":
                torch.cuda.empty_cache()
        raise
    return tensors
