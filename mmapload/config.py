"""The load configuration: one frozen ``LoadConfig``, validated once when it is built, before
any I/O. Every public verb (``stream_quantize``, ``iter_quantized``, ``convert``, ``load_into``,
``estimate``) takes exactly its keywords, with the same defaults, and builds it with
``config_from``. The library reads no environment variables and no argv.
"""

from __future__ import annotations

import difflib
import functools
import inspect
import re
from dataclasses import dataclass

import torch

from ._math import as_int
from .errors import OptionsError
from .fp8 import (DEFAULT_BLOCK, SCALE_DTYPES, Granularity, PerBlock, Scheme, as_scheme, check_fp8_dtype,
                  scale_dtype_of)
from .tp import TPPlan, tp_plan

__all__ = ["LoadConfig", "LoadOptions", "config_from", "public_verb", "UnknownOptionError", "KEYWORDS", "RING_BYTES", "MAX_SLOT_BYTES",
           "MIN_RING_BYTES", "IO_MODES", "POLICIES", "SCALE_DTYPES"]

RING_BYTES = 256 << 20       # the default host ring: 256 MiB
# Slots are at most 16 MiB: several slots in flight give read-ahead and copy/compute overlap,
# and on CUDA the two staging buffers (2 x a slot) plus the quantizer's scratch (16 MiB) stay
# inside the device contract's 64 MiB of transient memory.
MAX_SLOT_BYTES = 16 << 20
_SLOT_ALIGN = 4096           # page-aligned slots (O_DIRECT-ready, cache-line friendly)
MIN_RING_BYTES = 4 * _SLOT_ALIGN
IO_MODES = ("mmap", "pread", "direct", "view")
POLICIES = ("auto", "model", "names")   # how policy.py decides what is quantized
_FLAGS = ("progress", "drop_page_cache", "error_stats", "keep_partial")


@dataclass(frozen=True, init=False)
class LoadConfig:
    """What a load does, validated when built: every bad value is an ``OptionsError`` naming the
    keyword and the fix. Build it with keywords (the same the verbs take):

    Args:
        ring_bytes (int, default 256 MiB): bytes of the host ring the shards are read through;
            >= ``MIN_RING_BYTES`` (16 KiB). Slots: a quarter of it, at most 16 MiB, page-aligned
            (``slot_bytes``). numpy ints are accepted; bools, floats are not.
        fp8_dtype (torch.dtype or str, default torch.float8_e4m3fn): float8_e4m3fn or float8_e5m2
            (also "e4m3" / "e5m2").
        granularity (str, Granularity or Scheme, default "tensor"): "tensor" | "channel" | "block",
            or a ``PerTensor()`` / ``PerChannel()`` / ``PerBlock(rows, cols)`` scheme.
        block_size (two positive ints, default (128, 128)): the block of "block" (numpy ints
            accepted; no bools); also the block an FP8 source's scales are read with when the
            checkpoint declares none, whatever the granularity.
        scale_dtype ("float32" | "weight", default "float32"): the scales' dtype and arithmetic.
            "float32": ``scale = amax / fp8_max`` in float32 (a zero granule 1.0, else >= float32
            tiny), ``q = fp8(clamp(float32(w) / scale))``, as vLLM's online FP8. "weight": in the
            weight's own dtype, as compressed-tensors' ``calculate_qparams`` / ``_quantize``
            (llm-compressor's ``model_free_ptq`` writes these): ``scale = dtype(amax / fp8_max)``
            (a zero scale: ``torch.finfo(dtype).eps``), ``q = fp8(clamp(dtype(w / scale)))``;
            ``convert`` then writes the same bytes as ``model_free_ptq`` (bf16 scales of a bf16
            model). The two differ by one FP8 step in ~3% of a bf16 model's codes (the quotient
            rounded to bf16 first). FP8 sources keep their own scales (read as float32).
        skip (str or strs, default ()): tensor-name patterns (substring or glob) kept unquantized.
        ignore (str or strs, default ()): modules kept unquantized: a name, ``re:REGEX`` or a class
            name such as ``Embedding`` (compressed-tensors style).
        targets (str, strs or None, default None): modules quantized instead of the policy's rule
            (same patterns as ``ignore``). Empty or non-str patterns, bad ``re:`` expressions: errors.
        policy ("auto" | "model" | "names", default "auto"): judge tensors by the model of
            config.json (auto: when transformers can build it) or by names alone.
        fp8_weight_scale (positive finite float or None, default None): the scale of FP8 Linear
            weights stored without one.
        progress (bool, False): a progress line on stderr (tqdm when installed).
        drop_page_cache (bool, True): advise the kernel to drop shard pages once consumed.
        error_stats (bool, False): relative quantization error per tensor in the report.
        keep_partial (bool, False): on a device out-of-memory error the ``DeviceError`` carries
            what was loaded as ``.partial``; False frees it.
        io ("mmap" | "pread" | "direct" | "view", default "mmap"): how shards are read; anything else
            (a typo included) is an OptionsError, never a fallback.
        read_threads (int 1..64 or None, default None): threads copying into the ring; None: 2 on
            the CPU (1 on one core, for "view" and "direct"), up to 4 with CUDA (``read_threads_for``).
        tp_size (int >= 1, default 1): tensor parallelism: this process loads only its share of
            every sharded tensor (tp.py: column-parallel by output rows, row-parallel by input
            columns, as vLLM lays them out). > 1 needs ``process_group`` or an initialized
            ``torch.distributed`` default group of exactly that size (per-tensor scales and the
            per-row scales of row-parallel weights are all-reduced, so they do not depend on it).
        tp_rank (int or None, default None): this process's rank in the group; None: the group's
            ``get_rank``; a given value must equal it.
        process_group (``torch.distributed.ProcessGroup`` or None, default None): the TP group;
            None: the default group (when ``tp_size > 1``).
        tp_plan (mapping or None, default None): overrides of the default sharding, name pattern
            (a module or tensor name, or ``re:`` + regex) -> "column" | "row" | "replicate",
            first match wins (``tp.TPPlan``).
        tp_timeout (positive float, default 300.0): seconds each collective of the load waits for
            the other ranks before it raises ``TPError`` (a rank that died or fell behind).

    Stored: ``scheme`` (the parsed ``Scheme``) and ``source_block``; ``granularity`` and
    ``block_size`` are read-only views of them. ``LoadOptions`` is the same class.
    """
    ring_bytes: int
    fp8_dtype: torch.dtype
    scheme: Scheme
    source_block: tuple[int, int]
    scale_dtype: str
    skip: tuple[str, ...]
    ignore: tuple[str, ...]
    targets: tuple[str, ...] | None
    policy: str
    fp8_weight_scale: float | None
    progress: bool
    drop_page_cache: bool
    error_stats: bool
    keep_partial: bool
    io: str
    read_threads: int | None
    tp_size: int
    tp_rank: int | None
    process_group: object
    tp_plan: object
    tp_timeout: float

    def __init__(self, *, ring_bytes: int = RING_BYTES, fp8_dtype=torch.float8_e4m3fn,
                 granularity="tensor", block_size=DEFAULT_BLOCK, scale_dtype: str = "float32", skip=(), ignore=(), targets=None,
                 policy: str = "auto", fp8_weight_scale: float | None = None, progress: bool = False,
                 drop_page_cache: bool = True, error_stats: bool = False, keep_partial: bool = False,
                 io: str = "mmap", read_threads: int | None = None, tp_size: int = 1,
                 tp_rank: int | None = None, process_group=None, tp_plan=None, tp_timeout: float = 300.0):
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 - frozen dataclass
        set_("ring_bytes", _int("ring_bytes", ring_bytes, MIN_RING_BYTES, None,
                                f"an int number of bytes >= {MIN_RING_BYTES}, e.g. 256 << 20"))
        try:
            set_("fp8_dtype", check_fp8_dtype(fp8_dtype))
        except OptionsError as e:
            raise OptionsError(f"fp8_dtype: {e}") from None
        scheme = as_scheme(granularity, block_size)
        set_("scheme", scheme)
        set_("source_block", scheme.block if isinstance(scheme, PerBlock)
             else tuple(int(b) for b in block_size))
        for name, value in (("skip", skip), ("ignore", ignore), ("targets", targets)):
            set_(name, _patterns(name, value))
        fs = fp8_weight_scale
        if fs is not None and (isinstance(fs, bool) or not isinstance(fs, (int, float))
                               or not 0 < float(fs) < float("inf")):
            raise OptionsError(f"fp8_weight_scale must be None or a positive finite number, got {fs!r}")
        set_("fp8_weight_scale", fs)
        for name, value, allowed in (("policy", policy, POLICIES), ("io", io, IO_MODES),
                                     ("scale_dtype", scale_dtype, SCALE_DTYPES)):
            if not isinstance(value, str) or value not in allowed:
                raise OptionsError(f"{name} must be one of {allowed}, got {value!r}")
            set_(name, value)
        set_("read_threads", None if read_threads is None else _int(
            "read_threads", read_threads, 1, 64, "None (automatic) or an int from 1 to 64"))
        for name, value in zip(_FLAGS, (progress, drop_page_cache, error_stats, keep_partial)):
            if not isinstance(value, bool):
                raise OptionsError(f"{name} must be True or False, got {value!r}")
            set_(name, value)
        set_("tp_size", _int("tp_size", tp_size, 1, None, "an int >= 1 (1: no tensor parallelism)"))
        set_("tp_rank", None if tp_rank is None else _int(
            "tp_rank", tp_rank, 0, self.tp_size - 1, f"None (the group's rank) or an int in [0, {self.tp_size})"
            + ("; a rank other than 0 needs tp_size > 1 (--tp-size N on the command line)" if self.tp_size == 1 else "")))
        if process_group is not None and not _is_group(process_group):
            raise OptionsError(f"process_group must be a torch.distributed ProcessGroup or None, got {process_group!r}")
        set_("process_group", process_group)
        set_("tp_plan", _tp_plan(tp_plan))
        t = tp_timeout
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 < float(t) < float("inf"):
            raise OptionsError(f"tp_timeout must be a positive finite number of seconds, got {t!r}")
        set_("tp_timeout", float(t))

    @classmethod
    def from_kwargs(cls, **kwargs) -> "LoadConfig":
        """``LoadConfig(**kwargs)``, an unknown keyword an OptionsError listing the known ones."""
        unknown = sorted(set(kwargs) - set(KEYWORDS))
        if unknown:
            raise UnknownOptionError(f"unknown option(s) {unknown}; known options: {sorted(KEYWORDS)}")
        return cls(**kwargs)

    def as_kwargs(self) -> dict:
        """The keywords that rebuild this config (``LoadConfig(**c.as_kwargs()) == c``)."""
        return {k: getattr(self, k) for k in KEYWORDS if k not in ("granularity", "block_size")} | {
            "granularity": self.scheme, "block_size": self.source_block}

    @property
    def granularity(self) -> Granularity:
        """The scheme's ``Granularity`` member (read-only)."""
        return self.scheme.granularity

    @property
    def block_size(self) -> tuple[int, int]:
        """(rows, cols): the block of a ``PerBlock`` scheme, else the ``block_size`` keyword."""
        return self.source_block

    def scale_dtype_of(self, weight_dtype: torch.dtype) -> torch.dtype:
        """The dtype of a ``weight_dtype`` weight's scale under ``scale_dtype``: float32, or the
        weight's own (compressed-tensors'; see ``fp8.scale_from_amax``)."""
        return scale_dtype_of(self.scale_dtype, weight_dtype)

    @property
    def slot_bytes(self) -> int:
        """Bytes per ring slot: a quarter of the ring, at most MAX_SLOT_BYTES, page-aligned."""
        s = min(self.ring_bytes // 4, MAX_SLOT_BYTES)
        return s - s % _SLOT_ALIGN

    @property
    def n_slots(self) -> int:
        return self.ring_bytes // self.slot_bytes

    def whole_tensors(self, verb: str, why: str) -> None:
        """OptionsError if this config asks ``verb`` (which loads whole tensors: ``why``) for
        tensor parallelism."""
        if self.tp_size > 1:
            raise OptionsError(f"{verb}() got tp_size={self.tp_size}: {why}; load each rank's part with "
                               "stream_quantize / iter_quantized(tp_size=...), or pass tp_size=1")

    def read_threads_for(self, device: torch.device, cpus: int | None) -> int:
        """Threads copying into ring slots. Automatic: on the CPU 2 (1 on one core, and for
        io="view" and "direct", which copy nothing / read with one): the quantizer needs the cores,
        but one copy thread left it waiting on whole kept tensors (a warm 4 GiB io="mmap" load on
        2 cores: 3.59 s with 1, 3.10 s with 2); with
        CUDA, where the host only copies, up to 4 (half the CPUs): one thread's memcpy from the
        page cache falls short of a PCIe 4/5 link."""
        if self.read_threads is not None:
            return self.read_threads
        if device.type == "cpu":
            return 1 if self.io in ("view", "direct") else min(2, cpus or 1)
        return max(1, min(4, (cpus or 1) // 2))


LoadOptions = LoadConfig   # the earlier name; users import it
KEYWORDS: tuple[str, ...] = tuple(inspect.signature(LoadConfig.__init__).parameters)[1:]   # in order


def config_from(args: dict) -> LoadConfig:
    """The ``LoadConfig`` of a verb's arguments (its ``locals()``): the ``KEYWORDS`` among them."""
    return LoadConfig(**{k: args[k] for k in KEYWORDS})


class UnknownOptionError(OptionsError, TypeError):
    """A keyword a verb does not take: an OptionsError, and the TypeError Python would raise."""


def public_verb(verb):
    """Decorate a public verb: a keyword it does not take is an ``UnknownOptionError`` naming it,
    the nearest known keyword and all of them. The signature (``inspect.signature``) is the verb's."""
    known = inspect.signature(verb).parameters

    @functools.wraps(verb)
    def checked(*args, **kwargs):
        unknown = [k for k in kwargs if k not in known]
        if unknown:
            near = {k: difflib.get_close_matches(k, known, n=1) for k in unknown}
            hint = "; ".join(f"{k!r}: did you mean {m[0]!r}?" for k, m in near.items() if m)
            raise UnknownOptionError(f"{verb.__name__}() got unknown option(s) {sorted(unknown)}"
                                     f"{'; ' + hint if hint else ''}; known options: {sorted(known)}")
        return verb(*args, **kwargs)
    return checked


def _is_group(value) -> bool:
    try:
        from torch.distributed import ProcessGroup
    except ImportError:   # a torch built without distributed
        return False
    return isinstance(value, ProcessGroup)


def _tp_plan(value) -> TPPlan:
    """tp.tp_plan's validation, its OptionsError naming the option."""
    try:
        return tp_plan(value)
    except OptionsError as e:
        raise OptionsError(f"tp_plan: {e}") from None


def _int(name: str, value, low: int, high: int | None, want: str) -> int:
    """``value`` as an int (numpy ints too; no bools, floats) within [low, high]."""
    n = as_int(value)
    if n is None or n < low or (high is not None and n > high):
        raise OptionsError(f"{name} must be {want}, got {value!r}")
    return n


def _patterns(name: str, value) -> tuple[str, ...] | None:
    """A pattern option as a tuple of non-empty strings (a lone string is one pattern); None
    stays None for ``targets`` (no targets: the policy's own rule decides)."""
    if value is None:
        return None if name == "targets" else ()
    value = (value,) if isinstance(value, str) else value
    try:
        out = tuple(value)
    except TypeError:
        out = None
    if out is None or not all(isinstance(p, str) and p for p in out):
        raise OptionsError(f"{name} must be non-empty name patterns (str), got {value!r}")
    for p in out:
        if p.startswith("re:"):
            try:
                re.compile(p[3:])
            except re.error as e:
                raise OptionsError(f"{name}: {p!r} is not a valid regular expression ({e})") from None
    return out
