"""Write an FP8 safetensors checkpoint without ever holding the model in memory.

``convert(src, dst)`` streams ``src`` through ``iter_quantized`` and writes each tensor as
it arrives. Every output header is computed up front from the input headers (same rules
as the loader: ``should_quantize`` and ``scale_shape``), so each shard's header is written
first and its tensors are streamed after it; host memory stays at about the ring plus
the largest single output tensor. Written data is synced and dropped from the page cache
every ``SYNC_BYTES`` so it does not pile up as dirty cache (which a cgroup limit counts).

Layout: the input's shard file names (``model.safetensors`` for a single-file input) and a
``model.safetensors.index.json``. FP8 weights keep their name; their float32 scale is written
right after the weight. Other tensors are copied bit for bit. Each header's ``__metadata__``
is ``{"format": "pt", "mmapload": "<options as JSON>"}``.

``format`` says which engines' layout the output follows (the copied ``config.json`` gets
its ``quantization_config``; a source without a config.json, e.g. a single file, gets none):

- ``"compressed-tensors"`` (default; vLLM, transformers): ``<module>.weight`` FP8 e4m3 and
  ``<module>.weight_scale`` float32 ``[1]`` (tensor), ``[out, 1]`` (channel) or the block grid;
  ``ignore`` lists the 2-D weights kept in high precision (e.g. ``lm_head``).
- ``"fp8"`` (vLLM's native method, DeepSeek-V3): ``<module>.weight_scale`` ``[]`` per tensor, or
  ``<module>.weight_scale_inv`` (block grid; dequantize is ``q * s`` despite the name) with
  ``weight_block_size``. It has no per-channel scheme: "channel" is an OptionsError.
Both read FP8 as e4m3 only: fp8_dtype=float8_e5m2 is an OptionsError.

Failure safety: everything is written into a hidden sibling directory
``.<dst name>.mmapload-partial-<pid>`` that is renamed onto ``dst`` only at the very end.
A Python-level failure removes it; after a SIGKILL or power loss it stays behind, hidden
and named partial, and ``dst`` does not exist (or is left as it was).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from .checkpoint import INDEX_NAME, Checkpoint, open_checkpoint
from .errors import CheckpointError, FileChangedError, OptionsError
from .fp8 import Granularity, scale_shape
from .options import LoadOptions, should_quantize
from .result import QuantizedTensor
from .stream import iter_quantized
from .writer import SafetensorsWriter

__all__ = ["convert", "output_layout", "quantization_config", "scale_suffix", "FORMATS",
           "SCALE_SUFFIX", "SYNC_BYTES", "PARTIAL_MARK"]

SCALE_SUFFIX = "_scale"
FORMATS = ("compressed-tensors", "fp8")
_FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16"})
SYNC_BYTES = 64 << 20        # fdatasync + drop from the page cache every this many bytes written
PARTIAL_MARK = ".mmapload-partial-"

Entry = tuple[str, torch.dtype, tuple[int, ...]]


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


def _check_format(fmt, opts: LoadOptions) -> str:
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
        if (spec.dtype in _FLOAT_DTYPES and len(spec.shape) == 2 and spec.name.endswith(".weight")
                and not should_quantize(spec, opts) and "embed" not in low and "norm" not in low):
            out.append(spec.name[: -len(".weight")])
    return out


def quantization_config(fmt: str, opts: LoadOptions, ignore: list[str]) -> dict:
    """The ``quantization_config`` of config.json for ``fmt`` (see the module docstring)."""
    g, bs = opts.granularity, list(opts.block_size)
    if _check_format(fmt, opts) == "fp8":
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


def output_layout(ckpt: Checkpoint, opts: LoadOptions,
                  fmt: str = "compressed-tensors") -> list[tuple[str, list[Entry]]]:
    """``[(shard file name, [(name, dtype, shape), ...]), ...]`` of the converted checkpoint."""
    suffix = scale_suffix(_check_format(fmt, opts), opts)
    names = _shard_names(ckpt)
    if len(set(names.values())) != len(names):
        raise CheckpointError(f"{ckpt.root}: two shards would be written to the same file name: "
                              f"{sorted(names.values())}")
    layout, seen = [], {}
    for shard in ckpt.shards:
        entries: list[Entry] = []
        for spec in shard.tensors:
            if should_quantize(spec, opts):
                entries.append((spec.name, opts.fp8_dtype, spec.shape))
                entries.append((spec.name + suffix, torch.float32, _scale_out_shape(spec.shape, fmt, opts)))
            else:
                entries.append((spec.name, spec.torch_dtype, spec.shape))
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


def _metadata(opts: LoadOptions, fmt: str) -> dict[str, str]:
    info = {"granularity": opts.granularity.value, "fp8_dtype": str(opts.fp8_dtype).removeprefix("torch."),
            "block_size": list(opts.block_size), "scale_suffix": scale_suffix(fmt, opts)}
    return {"format": "pt", "mmapload": json.dumps(info, separators=(",", ":"))}


def _check_dst(src: Path, dst: Path, overwrite: bool) -> None:
    s, d = src.resolve(), dst.resolve()
    if s == d or d in s.parents or s in d.parents:
        raise OptionsError(f"destination {dst} is, contains or lies inside the source {src}; "
                           "write the converted checkpoint somewhere else")
    if overwrite or not (dst.exists() or dst.is_symlink()):
        return
    if dst.is_dir() and not dst.is_symlink() and not any(dst.iterdir()):
        return   # an empty directory is replaced by the rename
    raise OptionsError(f"destination {dst} already exists and is not an empty directory; pass "
                       "overwrite=True (mmapload convert --overwrite) to replace it, or choose another path")


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _copy_extras(root: Path, out: Path, qconfig: dict) -> None:
    """config.json, tokenizer and generation files: every regular, non-hidden top-level file
    of the source folder except shards and the index, copied as they are, except that
    config.json gets ``quantization_config`` (any earlier one replaced)."""
    for p in sorted(root.iterdir()):
        if (p.name.startswith(".") or p.name.endswith(".safetensors") or p.name == INDEX_NAME
                or not p.is_file()):
            continue
        if p.name == "config.json":
            try:
                cfg = json.loads(p.read_text("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise CheckpointError(f"{p}: not valid JSON ({e}); cannot add quantization_config") from None
            if not isinstance(cfg, dict):
                raise CheckpointError(f"{p}: holds a JSON {type(cfg).__name__}, not an object; "
                                      "cannot add quantization_config")
            cfg["quantization_config"] = qconfig
            (out / p.name).write_text(json.dumps(cfg, indent=2) + "\n", "utf-8")
        else:
            shutil.copyfile(p, out / p.name)
        _fsync_path(out / p.name)


def _check_piece(expected: Entry, name: str, t: torch.Tensor, src: Path) -> None:
    want, dtype, shape = expected
    if name != want or t.dtype != dtype or tuple(t.shape) != tuple(shape):
        raise FileChangedError(f"{src}: streamed tensor {name!r} ({t.dtype}, {list(t.shape)}) does not "
                               f"match the header read before, which expected {want!r} ({dtype}, "
                               f"{list(shape)}) here; did the checkpoint change during the conversion?")


def _write_all(stream, layout, tmp: Path, opts: LoadOptions, src: Path, fmt: str) -> int:
    """Write every shard of ``layout`` from ``stream`` into ``tmp``; returns total data bytes."""
    meta, total, suffix = _metadata(opts, fmt), 0, scale_suffix(fmt, opts)
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
                        pt = pt.reshape(want[2])   # per-tensor scale: [] or [1] as the format says
                    _check_piece(want, pname, pt, src)
                    w.write(pname, pt)
                    i += 1
                del t, parts
            total += w.data_bytes
    if next(stream, None) is not None:
        raise FileChangedError(f"{src}: the stream yielded more tensors than its headers declared")
    return total


def convert(src, dst, *, device="cpu", overwrite: bool = False, format: str = "compressed-tensors",
            **quant_options) -> Path:
    """Stream the checkpoint ``src`` into an FP8 safetensors checkpoint folder ``dst``.

    ``format``: "compressed-tensors" (default) or "fp8", the layout and ``quantization_config``
    vLLM / transformers load (see the module docstring); e5m2, and channel with "fp8", raise
    ``OptionsError``. A source without config.json gives an output without one.

    ``quant_options`` are the options of ``stream_quantize`` (ring_bytes, fp8_dtype,
    granularity, block_size, skip, progress, drop_page_cache, ...); ``device`` is where the
    quantization runs. Host memory peaks at about the ring plus the largest output tensor.

    ``dst`` must not exist or be an empty directory. With ``overwrite=True`` an existing
    ``dst`` (file or folder, with everything in it) is deleted: only once the new checkpoint
    is complete (it is moved aside, the new one renamed in, then it is removed), so a failed
    conversion leaves the old ``dst`` untouched (the disk needs room for both meanwhile).
    The output is written into ``.<dst name>.mmapload-partial-<pid>`` next to ``dst`` and
    renamed onto it at the very end: a failure never leaves a complete-looking ``dst``.
    A Python-level failure (bad input, disk full, Ctrl-C) removes that directory; a killed
    process leaves it behind (hidden, named partial: delete it).

    Returns ``dst``. Raises ``MmapLoadError`` subclasses (naming file, tensor and offsets)
    on bad input, ``OSError`` from the file system.
    """
    src, dst = Path(src), Path(dst)
    _check_dst(src, dst, overwrite)
    opts = LoadOptions.from_kwargs(**quant_options)
    _check_format(format, opts)                              # before the reader starts
    stream = iter_quantized(src, device, **quant_options)   # validates device and checkpoint
    ckpt = open_checkpoint(src)
    layout = output_layout(ckpt, opts, format)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.parent / f".{dst.name}{PARTIAL_MARK}{os.getpid()}"
    if tmp.exists():   # left by a killed process whose pid we now have: it is dead
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        total = _write_all(stream, layout, tmp, opts, src, format)
        stream.close()
        weight_map = {name: fname for fname, entries in layout for name, _, _ in entries}
        (tmp / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": total},
                                                  "weight_map": weight_map}, indent=2))
        _fsync_path(tmp / INDEX_NAME)
        if ckpt.root.is_dir():
            _copy_extras(ckpt.root, tmp, quantization_config(format, opts, ignored_modules(ckpt, opts)))
        _fsync_path(tmp)
        _swap_in(tmp, dst, overwrite)
    except BaseException:
        stream.close()        # joins the reader thread
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _swap_in(tmp: Path, dst: Path, overwrite: bool) -> None:
    """Rename ``tmp`` onto ``dst`` (atomic: dst appears complete or not at all). With
    ``overwrite`` an existing dst is first renamed aside, put back if the rename fails, and
    deleted once the new one is in place."""
    old = None
    if overwrite and (dst.exists() or dst.is_symlink()):
        old = dst.parent / f".{dst.name}.mmapload-old-{os.getpid()}"
        _remove(old)
        os.rename(dst, old)
    try:
        os.rename(tmp, dst)
    except BaseException:
        if old is not None:
            os.rename(old, dst)
        raise
    _fsync_path(dst.parent)
    if old is not None:
        _remove(old)
