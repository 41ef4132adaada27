"""Load options: one frozen dataclass, validated when it is built, before any I/O.

The library reads no environment variables and no argv; every knob is a keyword argument
of ``stream_quantize`` / ``iter_quantized`` that lands here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, fields

import torch

from .errors import OptionsError
from .fp8 import Granularity, check_fp8_dtype, parse_granularity

__all__ = ["LoadOptions", "MAX_SLOT_BYTES", "MIN_RING_BYTES", "IO_MODES", "POLICIES"]

# Slots are at most 16 MiB: several slots in flight give read-ahead and copy/compute overlap,
# and on CUDA the two staging buffers (2 x a slot) plus the quantizer's scratch (16 MiB) stay
# inside the device contract's 64 MiB of transient memory.
MAX_SLOT_BYTES = 16 << 20
_SLOT_ALIGN = 4096           # page-aligned slots (O_DIRECT-ready, cache-line friendly)
MIN_RING_BYTES = 4 * _SLOT_ALIGN
IO_MODES = ("mmap", "pread", "direct")
POLICIES = ("auto", "model", "names")   # how policy.py decides what is quantized


@dataclass(frozen=True)
class LoadOptions:
    ring_bytes: int = 256 << 20
    fp8_dtype: torch.dtype = torch.float8_e4m3fn
    granularity: Granularity | str = Granularity.TENSOR
    block_size: tuple[int, int] = (128, 128)
    skip: tuple[str, ...] = ()
    ignore: tuple[str, ...] = ()
    targets: tuple[str, ...] | None = None
    policy: str = "auto"
    fp8_weight_scale: float | None = None   # the scale of FP8 Linear weights stored without one
    progress: bool = False
    drop_page_cache: bool = True
    error_stats: bool = False
    keep_partial: bool = False
    io: str = "mmap"
    read_threads: int | None = None   # None: 1 on the CPU, up to 4 with CUDA (see read_threads_for)

    def __post_init__(self) -> None:
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 - frozen dataclass
        if isinstance(self.ring_bytes, bool) or not isinstance(self.ring_bytes, int):
            raise OptionsError(f"ring_bytes must be an int number of bytes, got {self.ring_bytes!r}")
        if self.ring_bytes < MIN_RING_BYTES:
            raise OptionsError(f"ring_bytes={self.ring_bytes} is below the minimum of {MIN_RING_BYTES}")
        set_("fp8_dtype", check_fp8_dtype(self.fp8_dtype))
        set_("granularity", parse_granularity(self.granularity))
        bs = self.block_size
        if (not isinstance(bs, (tuple, list)) or len(bs) != 2
                or not all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in bs)):
            raise OptionsError(f"block_size must be two positive ints, got {bs!r}")
        set_("block_size", tuple(bs))
        for name in ("skip", "ignore", "targets"):
            set_(name, _patterns(name, getattr(self, name)))
        fs = self.fp8_weight_scale
        if fs is not None and (isinstance(fs, bool) or not isinstance(fs, (int, float))
                               or not 0 < float(fs) < float("inf")):
            raise OptionsError(f"fp8_weight_scale must be None or a positive finite number, got {fs!r}")
        if self.policy not in POLICIES:
            raise OptionsError(f"policy must be one of {POLICIES}, got {self.policy!r}")
        if self.io not in IO_MODES:
            raise OptionsError(f"io must be one of {IO_MODES}, got {self.io!r}")
        rt = self.read_threads
        if rt is not None and (isinstance(rt, bool) or not isinstance(rt, int) or not 1 <= rt <= 64):
            raise OptionsError(f"read_threads must be None (automatic) or an int from 1 to 64, got {rt!r}")
        for name in ("progress", "drop_page_cache", "error_stats", "keep_partial"):
            if not isinstance(getattr(self, name), bool):
                raise OptionsError(f"{name} must be True or False, got {getattr(self, name)!r}")

    @classmethod
    def from_kwargs(cls, **kwargs) -> "LoadOptions":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise OptionsError(f"unknown option(s) {unknown}; known options: {sorted(known)}")
        return cls(**kwargs)

    @property
    def slot_bytes(self) -> int:
        """Bytes per ring slot: a quarter of the ring, at most MAX_SLOT_BYTES, page-aligned."""
        s = min(self.ring_bytes // 4, MAX_SLOT_BYTES)
        return s - s % _SLOT_ALIGN

    @property
    def n_slots(self) -> int:
        return self.ring_bytes // self.slot_bytes

    def read_threads_for(self, device: torch.device, cpus: int | None) -> int:
        """Threads copying into ring slots. Automatic: 1 on the CPU, where the quantizer needs
        the cores; with CUDA, where the host only copies, up to 4 (half the CPUs): one thread's
        memcpy from the page cache falls short of a PCIe 4/5 link."""
        if self.read_threads is not None:
            return self.read_threads
        return 1 if device.type == "cpu" else max(1, min(4, (cpus or 1) // 2))


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
