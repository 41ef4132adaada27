"""Write an FP8 safetensors checkpoint without ever holding the model in memory.

``convert(src, dst)`` streams ``src`` through ``iter_quantized`` and writes each tensor as
it arrives. Every output header is computed up front from the input headers (same rules
as the loader: the policy (policy.py) and ``scale_shape``), so each shard's header is written
first and its tensors are streamed after it; host memory stays at about the ring plus
the largest single output tensor. Written data is synced and dropped from the page cache
every ``SYNC_BYTES`` so it does not pile up as dirty cache (which a cgroup limit counts).

Layout and formats ("compressed-tensors", "fp8"): formats.py. A ``model.safetensors.index.json``
is always written; config.json (when the source has one) gets the format's ``quantization_config``.

Failure safety: everything is written into a hidden sibling directory
``.<dst name>.mmapload-partial-<pid>`` (outdir.py) that is renamed onto ``dst`` only at the very
end. A Python-level failure removes it; after a SIGKILL or power loss it stays behind, hidden and
named partial, ``dst`` does not exist (or is left as it was), and the next conversion into the same
``dst`` removes it once its process is gone.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch

from .checkpoint import INDEX_NAME, open_checkpoint
from .dtypes import FP8, torch_dtype_of, torch_shape
from .errors import CheckpointError, FileChangedError, MmapLoadError, OptionsError, warn
from .formats import KEPT_BY_CONVERT, Entry, check_format, convert_policy, ignored_modules, output_layout, \
    quantization_config, scale_suffix, shard_metadata, single_file
from .fp8 import Granularity
from .config import RING_BYTES, LoadOptions, config_from, public_verb
from .ctvalidate import BACKGROUND_BYTES, Validator, validate_in_process
from .outdir import PARTIAL_MARK, copy_extras, fsync_path, remove_stale_partials, swap_in, work_name
from .policy import CONV1D, LINEAR, Policy, matches_module
from .prequantized import SCALE_HEADER_DTYPES, fp8_pairs
from .result import QuantizedTensor
from .stream import GuessedWrong, prepare, prepare_soon, results, room_beside, stands, watched
from .writer import SafetensorsWriter

__all__ = ["convert", "engine_plan", "SYNC_BYTES", "PARTIAL_MARK"]

_PER_EXPERT = re.compile(r"\.experts\.\d+\.")   # Mixtral / Qwen-MoE / DeepSeek per-expert Linear weights
SYNC_BYTES = 64 << 20        # fdatasync + drop from the page cache every this many bytes written


def _check_dst(src: Path, dst: Path, overwrite: bool) -> None:
    s, d = src.resolve(), dst.resolve()
    if s == d or d in s.parents or s in d.parents:
        raise OptionsError(f"destination {dst} is, contains or lies inside the source {src}; "
                           "write the converted checkpoint somewhere else")
    if not (dst.exists() or dst.is_symlink()):
        return
    if not dst.is_symlink() and not (dst.is_dir() or dst.is_file()):
        raise OptionsError(f"destination {dst} is not a folder or a file (a device, FIFO or socket); "
                           "choose a folder path for the converted checkpoint")
    if dst.is_dir() and not dst.is_symlink() and not any(dst.iterdir()):
        return   # an empty directory is replaced by the rename
    if overwrite:
        if dst.is_symlink() or _holds_checkpoint(dst):
            return   # a link is replaced itself, never what it points to
        raise OptionsError(f"destination {dst} exists and holds no checkpoint (it is not a .safetensors file, "
                           f"nor a folder with a *.safetensors, {INDEX_NAME} or config.json at its top); overwrite=True "
                           "(--overwrite) replaces only a checkpoint, so as not to delete other data: remove it "
                           "yourself, or choose another path")
    raise OptionsError(f"destination {dst} already exists and is not an empty directory; pass "
                       "overwrite=True (mmapload convert --overwrite) to replace it, or choose another path")


def _holds_checkpoint(path: Path) -> bool:
    """A safetensors file, or a folder with a shard, an index or config.json at its top."""
    if path.is_file():
        return path.name.endswith(".safetensors")
    return any(p.name.endswith(".safetensors") or p.name in (INDEX_NAME, "config.json") for p in path.iterdir())


def _check_piece(expected: Entry, name: str, t: torch.Tensor, src: Path) -> None:
    want, dtype, shape = expected   # dtype: a safetensors name (None: past the shard's end)
    form = (torch_dtype_of(dtype), torch_shape(dtype, shape)) if dtype else (None, ())
    if name != want or (t.dtype, tuple(t.shape)) != form:
        raise FileChangedError(f"{src}: streamed tensor {name!r} ({t.dtype}, {list(t.shape)}) does not "
                               f"match the header read before, which expected {want!r} ({dtype} "
                               f"{list(shape)}: {form[0]}, {list(form[1])}) here; did the checkpoint "
                               "change during the conversion?")


def _write_all(stream, layout, tmp: Path, opts: LoadOptions, src: Path, fmt: str) -> int:
    """Write every shard of ``layout`` from ``stream`` into ``tmp``; returns total data bytes."""
    meta, total, suffix = shard_metadata(opts, fmt), 0, scale_suffix(fmt, opts)
    for fname, entries in layout:
        (tmp / fname).parent.mkdir(parents=True, exist_ok=True)
        with SafetensorsWriter(tmp / fname, entries, meta, sync_bytes=SYNC_BYTES) as w:
            i = 0
            while i < len(entries):
                name, t = next(stream, (None, None))
                if name is None:
                    raise FileChangedError(f"{src}: the stream ended before tensor {entries[i][0]!r} of "
                                           f"shard {fname}; did the checkpoint change during the conversion?")
                parts = [(name, t.data), (name + suffix, t.scale)] if isinstance(t, QuantizedTensor) \
                    else [(name, t)]
                for pname, pt in parts:
                    want = entries[i] if i < len(entries) else ("<end of shard>", None, ())
                    if pname != name and pt.numel() == 1 and want[0] == pname:
                        # per-tensor scale: [] or [1] as the format says; fp8_weight_scale: any grid
                        pt = torch.empty(want[2], dtype=pt.dtype).copy_(pt.reshape(()))
                    _check_piece(want, pname, pt, src)
                    w.write(pname, pt)
                    i += 1
                del t, parts
            total += w.data_bytes
    if next(stream, None) is not None:
        raise FileChangedError(f"{src}: the stream yielded more tensors than its headers declared")
    return total


@public_verb
def convert(src, dst, *, device="cpu", overwrite: bool = False, format: str = "compressed-tensors",
            ring_bytes: int = RING_BYTES, fp8_dtype=torch.float8_e4m3fn, granularity="tensor",
            block_size=(128, 128), scale_dtype: str = "float32", skip=(), ignore=(), targets=None,
            policy: str = "auto",
            fp8_weight_scale: float | None = None, progress: bool = False, drop_page_cache: bool = True,
            error_stats: bool = False, keep_partial: bool = False, io: str = "mmap",
            read_threads: int | None = None,
            tp_size: int = 1, tp_rank: int | None = None, process_group=None, tp_plan=None,
            tp_timeout: float = 300.0) -> Path:
    """Stream the checkpoint ``src`` into an FP8 safetensors checkpoint folder ``dst``.

    ``format``: "compressed-tensors" (default) or "fp8", the layout and ``quantization_config``
    vLLM / transformers load (see the module docstring); e5m2, and channel with "fp8", raise
    ``OptionsError``. A source without config.json gives an output without one.

    What is quantized is the policy's (policy.py: Linear weights of the model config.json
    describes, or the name rule), except fused ``[E, rows, cols]`` expert tensors: neither format
    can describe them as FP8, so they are written in high precision (a ``MmapLoadWarning`` says
    so). The written ``quantization_config`` is checked against the written files before ``dst``
    appears: every FP8 weight has its scale and is targeted, every targeted Linear is FP8, and
    ``ignore`` names the rest. A source quantized by another method (GPTQ, AWQ, ...) raises
    ``QuantizedSourceError``; FP8 Linear weights stored without a scale raise ``OptionsError``
    unless the option ``fp8_weight_scale`` says what their scale is.

    Host memory peaks at about the ring plus the largest output tensor.

    ``dst`` must not exist or be an empty directory. With ``overwrite=True`` an existing
    ``dst`` (file or folder, with everything in it) is deleted: only once the new checkpoint
    is complete (it is moved aside, the new one renamed in, then it is removed), so a failed
    conversion leaves the old ``dst`` untouched (the disk needs room for both meanwhile).
    The output is written into ``.<dst name>.mmapload-partial-<pid>`` next to ``dst`` and
    renamed onto it at the very end: a failure never leaves a complete-looking ``dst``.
    A Python-level failure (bad input, disk full, Ctrl-C) removes that directory; a killed
    process leaves it behind, and the next conversion into the same ``dst`` removes it (when no
    process with its pid runs). A symlink ``dst`` is replaced, never what it points to. Extra
    files that are symlinks leading out of the source folder are not copied (a warning says so).

    Args:
        src (`str` or `os.PathLike`): a ``.safetensors`` file, a sharded index, or a folder.
        dst (`str` or `os.PathLike`): the output folder (see above).
        device (`str` or `torch.device`, default "cpu"): where the quantization runs.
        overwrite (`bool`, default False): replace an existing ``dst`` once the new one is complete.
        format (`str`, default "compressed-tensors"): "compressed-tensors" or "fp8".
        ring_bytes, fp8_dtype, granularity, block_size, scale_dtype, skip, ignore, targets, policy,
            fp8_weight_scale, progress, drop_page_cache, error_stats, keep_partial, io, read_threads,
            tp_size, tp_rank, process_group, tp_plan, tp_timeout:
            the load options, each documented (units, default, errors) on ``mmapload.LoadConfig``;
            the defaults here are its defaults.

    Returns:
        `pathlib.Path`: ``dst``.

    Raises:
        OptionsError: a bad option or ``dst`` (naming it), before anything is written.
        MmapLoadError subclasses (naming file, tensor and offsets): bad input. OSError: the file system.

    Example:

    ```python
    from mmapload import convert

    convert("Llama-3.1-8B", "Llama-3.1-8B-FP8", granularity="channel", format="compressed-tensors")
    ```
    """
    opts = config_from(locals())   # validates every option before anything else
    opts.whole_tensors("convert", "it writes whole tensors to one checkpoint")
    src, dst = Path(src), Path(dst)
    _check_dst(src, dst, overwrite)
    check_format(format, opts)   # before the reader starts
    narrow = lambda p: convert_policy(p, opts)  # noqa: E731
    pipe, guess = prepare_soon(src, device, opts, narrow=narrow)
    validator = (Validator(background=pipe.ckpt.total_bytes >= BACKGROUND_BYTES   # imports while we read
                           and room_beside(pipe.ckpt, pipe.device, opts))
                 if format == "compressed-tensors" else None)
    try:
        try:
            return _convert(pipe, guess, dst, src, opts, format, overwrite, validator)
        except GuessedWrong:
            pass
        except MmapLoadError:
            if stands(guess):
                raise
        # the model's policy decides otherwise than the name rule: again, on the model's
        return _convert(guess.again(), None, dst, src, opts, format, overwrite, validator)
    finally:
        if guess is not None:
            guess.cancel()
        if validator is not None:
            validator.close()


def _convert(pipe, guess, dst: Path, src: Path, opts: LoadOptions, format: str, overwrite: bool,
             validator: Validator | None) -> Path:
    """convert's load and write: ``guess`` (stream.prepare_soon) is checked while the stream is
    written, and settled before anything that names the model (the quantization_config's ignore
    list, the check of what was written) is decided."""
    ckpt, policy = pipe.ckpt, pipe.policy
    layout = output_layout(ckpt, opts, format, policy)
    if guess is None:
        _warn(ckpt, policy, opts, format)
    stream = results(pipe)
    dst.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(dst)   # left by killed processes (ours too, if a dead one had our pid)
    tmp = work_name(dst)
    tmp.mkdir()
    try:
        total = _write_all(watched(stream, guess), layout, tmp, opts, src, format)
        stream.close()
        if guess is not None:
            policy = guess.policy   # settled by watched(): decides as the guess did
            _warn(ckpt, policy, opts, format)
        qconfig = quantization_config(format, opts, ignored_modules(ckpt, policy))
        weight_map = {name: fname for fname, entries in layout for name, _, _ in entries}
        (tmp / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": total},
                                                  "weight_map": weight_map}, indent=2))
        fsync_path(tmp / INDEX_NAME)
        if not single_file(ckpt):   # config.json as read once, by policy_for
            copy_extras(ckpt.root, tmp, qconfig, policy.config)
        check_written(tmp, format, opts, qconfig, policy, validator)
        fsync_path(tmp)
        swap_in(tmp, dst, overwrite)
    except BaseException:
        stream.close()        # joins the reader thread
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst


def _warn(ckpt, policy: Policy, opts: LoadOptions, format: str) -> None:
    """What the user should know about the output: tensors kept that stream_quantize quantizes,
    per-expert block scales transformers cannot read."""
    if not any(policy(s) for s in ckpt.tensors) and not fp8_pairs(ckpt, policy.config, opts.block_size):
        warn(f"{ckpt.root}: no tensor is quantized ({policy.source}): the output holds no FP8 weight; "
             "check skip / ignore / targets, or whether the model's layers are ones no FP8 format describes "
             "(e.g. GPT-2's Conv1D)")
    kept = [(s.name, d.rule) for s in ckpt.tensors if KEPT_BY_CONVERT in (d := policy.decide(s)).rule]
    if kept:
        warn(f"{ckpt.root}: {len(kept)} tensor(s) that stream_quantize quantizes are written in high "
             f"precision, because no FP8 checkpoint format describes them; e.g. {kept[0][0]!r}: {kept[0][1]}")
    experts = [s.name for s in ckpt.tensors if _PER_EXPERT.search(s.name) and policy(s)]
    if experts and opts.granularity is Granularity.BLOCK and format == "compressed-tensors":
        warn(f"{ckpt.root}: {len(experts)} per-expert MoE weights (e.g. {experts[0]!r}) are written with "
             "block scales: vLLM's FusedMoE reads them, transformers 5 cannot (it fuses the experts "
             "and multiplies q * scale without expanding the block grid); for transformers, convert "
             "with granularity='channel' or 'tensor'")


def engine_plan(src, device, opts: LoadOptions, fmt: str = "compressed-tensors"):
    """What an engine loading ``src`` as ``convert(src, ..., format=fmt)`` wrote it gets, without
    the files: the pipeline (convert's policy; nothing read yet) and the ``quantization_config``
    describing its stream. ``convert`` writes exactly this (computed the same way, once the model's
    policy is settled: see ``stream.prepare_soon``); the vLLM plugin hands it to vLLM.
    Raises what ``prepare`` and ``check_format`` raise."""
    check_format(fmt, opts)
    pipe = prepare(src, device, opts, narrow=lambda p: convert_policy(p, opts))
    return pipe, quantization_config(fmt, opts, ignored_modules(pipe.ckpt, pipe.policy))


def check_written(out: Path, fmt: str, opts: LoadOptions, qconfig: dict, policy: Policy,
                  validator: Validator | None = None) -> None:
    """Read the written headers back as an engine would apply ``qconfig`` to them: a Linear
    weight (per ``policy``) is targeted (not in ``ignore``) exactly when it is FP8 with its scale
    (F32, BF16 or F16); an FP8 tensor with a scale is a targeted Linear weight. Other tensors are plain data.
    A compressed-tensors ``qconfig`` must pass the library's own validator (``validator``: one
    started before, ctvalidate.py; None: in this process, when installed). ``CheckpointError``
    if not."""
    ckpt = open_checkpoint(out)
    suffix = scale_suffix(fmt, opts)
    ignore = qconfig.get("ignore" if fmt == "compressed-tensors" else "ignored_layers", [])
    for spec in ckpt.tensors:
        module, _, attr = spec.name.rpartition(".")
        scale = ckpt.get(spec.name + suffix)
        fp8 = spec.dtype in FP8
        scaled = fp8 and scale is not None and scale.dtype in SCALE_HEADER_DTYPES
        linear = attr == "weight" and policy.decide(spec).kind in (LINEAR, CONV1D)   # what engines target
        if not linear and not scaled:
            continue   # plain data: no config speaks of it
        targeted = linear and not any(matches_module(module, p) for p in ignore)
        where = f"{spec.shard}: tensor {spec.name!r} ({spec.dtype} {list(spec.shape)})"
        if scaled and not targeted:
            raise CheckpointError(f"{where} is FP8 with a scale but quantization_config does not target it "
                                  "(not a Linear weight, or ignored): an engine would not dequantize it")
        if targeted and not scaled:
            raise CheckpointError(f"{where} is a Linear weight that quantization_config targets but it is "
                                  + ("FP8 without a float scale" if fp8 else f"not FP8: add {module!r} to ignore"))
    if fmt == "compressed-tensors":
        why = validator.check(qconfig) if validator is not None else validate_in_process(qconfig)
        if why is not None:
            raise CheckpointError(f"{out}: compressed-tensors rejects the quantization_config written to "
                                  f"config.json: {why}")
