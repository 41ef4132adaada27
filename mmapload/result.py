"""What a load leaves behind: FP8 tensors with their scales, and a report of the load."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable, Iterator

import torch

from .fp8 import Granularity, Scheme, as_scheme, dequantize

__all__ = ["QuantizedTensor", "QuantizedModel", "LoadReport", "Loaded", "OutFor", "provided_output",
           "tensor_nbytes", "flat"]


def tensor_nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


@dataclass(frozen=True, eq=False)
class QuantizedTensor:
    """An FP8 weight: ``data`` (same shape as the source) and its ``scale`` (float32; the source
    weight's dtype when loaded with ``scale_dtype="weight"``).

    ``dequantize()`` gives ``data * scale`` broadcast per granule. ``rel_error`` is
    ``||w - dequantize()|| / ||w||`` when the load was asked for error statistics.
    """

    data: torch.Tensor
    scale: torch.Tensor
    orig_dtype: torch.dtype
    granularity: Granularity = Granularity.TENSOR
    block_size: tuple[int, int] = (128, 128)
    rel_error: float | None = None

    @property
    def shape(self) -> torch.Size:
        return self.data.shape

    @property
    def device(self) -> torch.device:
        return self.data.device

    @property
    def nbytes(self) -> int:
        return tensor_nbytes(self.data) + tensor_nbytes(self.scale)

    @property
    def scheme(self) -> Scheme:
        """The FP8 scheme of ``scale`` (``PerTensor()`` / ``PerChannel()`` / ``PerBlock(r, c)``)."""
        return as_scheme(self.granularity, self.block_size)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight in ``dtype`` (default: the checkpoint's dtype)."""
        return dequantize(self.data, self.scale, self.scheme, dtype=dtype or self.orig_dtype)

    def __repr__(self) -> str:
        return (f"QuantizedTensor(shape={tuple(self.shape)}, dtype={self.data.dtype}, "
                f"scale={tuple(self.scale.shape)}, granularity={self.granularity.value}, "
                f"orig_dtype={self.orig_dtype}, device={self.device})")


Loaded = QuantizedTensor | torch.Tensor   # what a load yields for one tensor
# where a tensor kept as it is gets read into: (name, shape, dtype) -> a tensor the caller owns, or None
OutFor = Callable[[str, tuple, torch.dtype], "torch.Tensor | None"]


def provided_output(out_for: OutFor | None, name: str, shape: tuple, dtype: torch.dtype,
                    device: torch.device) -> torch.Tensor | None:
    """``out_for``'s tensor for ``name`` if it can take the tensor as it is (that shape and dtype,
    contiguous, on ``device``); None otherwise, and the load allocates its own."""
    t = out_for(name, tuple(shape), dtype) if out_for is not None else None
    if (isinstance(t, torch.Tensor) and tuple(t.shape) == tuple(shape) and t.dtype == dtype
            and t.is_contiguous() and t.device == device):
        return t
    return None


@dataclass
class LoadReport:
    """Numbers of one load. Bytes are bytes, times are seconds."""

    path: str = ""
    device: str = "cpu"
    tensors: int = 0
    quantized: int = 0
    bytes_read: int = 0             # checkpoint bytes streamed through the ring
    retained_bytes: int = 0         # bytes kept on the device (FP8 + scales + kept tensors)
    seconds: float = 0.0
    ring_bytes: int = 0             # the ring allocated: n slots x slot_bytes (<= the ring_bytes asked)
    slot_bytes: int = 0
    pinned: bool = False
    read_threads: int = 1           # threads copying into ring slots
    policy: str = ""                # what decided which tensors are quantized (policy.py)
    rss_before: int = 0             # host RSS when the load started
    peak_rss: int = 0               # highest host RSS seen during the load
    peak_rss_anon: int | None = None
    peak_rss_file: int | None = None
    device_peak: int | None = None  # torch.cuda.max_memory_allocated during the load
    stage_seconds: dict[str, float] = field(default_factory=dict)
    tp_rank: int = 0                # tensor parallelism: this rank's part of each sharded tensor
    tp_size: int = 1
    collectives: int = 0            # collectives the load ran (TP: amax all-reduces, checks)

    @property
    def gbps(self) -> float:
        return self.bytes_read / self.seconds / 1e9 if self.seconds > 0 else 0.0

    def as_dict(self) -> dict:
        d = asdict(self)
        d["gbps"] = self.gbps
        return d

    def format(self) -> str:
        mib = lambda b: "n/a" if b is None else f"{b / 2**20:,.1f} MiB"  # noqa: E731
        lines = [
            f"checkpoint      {self.path}",
            f"device          {self.device}",
            f"tensors         {self.tensors} ({self.quantized} quantized to FP8, decided by {self.policy or '-'})",
            f"read            {mib(self.bytes_read)} in {self.seconds:.2f} s ({self.gbps:.2f} GB/s)",
            f"retained        {mib(self.retained_bytes)}",
            f"ring            {mib(self.ring_bytes)} ({self.slot_bytes // 2**20 or self.slot_bytes} "
            f"{'MiB' if self.slot_bytes >= 2**20 else 'B'} slots, {'pinned' if self.pinned else 'pageable'}, "
            f"{self.read_threads} read thread{'s' if self.read_threads > 1 else ''})",
            f"host RSS        before {mib(self.rss_before)}, peak {mib(self.peak_rss)} "
            f"(+{mib(self.peak_rss - self.rss_before)}; anon {mib(self.peak_rss_anon)}, "
            f"file-backed {mib(self.peak_rss_file)})",
            f"device peak     {mib(self.device_peak)}",
        ]
        if self.tp_size > 1:
            lines.insert(1, f"tensor parallel rank {self.tp_rank} of {self.tp_size} ({self.collectives} collectives)")
        if self.stage_seconds:
            lines.append("stages          " + ", ".join(
                f"{k} {v:.2f} s" for k, v in self.stage_seconds.items()))
        return "\n".join(lines)


class QuantizedModel(Mapping):
    """Read-only mapping name -> ``QuantizedTensor`` (FP8 weights) or ``torch.Tensor``."""

    def __init__(self, tensors: dict[str, QuantizedTensor | torch.Tensor], report: LoadReport):
        self._tensors = dict(tensors)
        self.report = report

    def __getitem__(self, name: str) -> QuantizedTensor | torch.Tensor:
        return self._tensors[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)

    @property
    def nbytes(self) -> int:
        """Bytes retained on the device."""
        return sum(t.nbytes if isinstance(t, QuantizedTensor) else tensor_nbytes(t)
                   for t in self._tensors.values())

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Flat name -> tensor: each FP8 weight plus its ``<name>_scale``."""
        return dict(flat(self._tensors.items()))

    def __repr__(self) -> str:
        q = sum(isinstance(t, QuantizedTensor) for t in self._tensors.values())
        return f"QuantizedModel({len(self)} tensors, {q} FP8, {self.nbytes / 2**20:.1f} MiB retained)"


def flat(items: Iterable[tuple[str, QuantizedTensor | torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    """``("x.weight", fp8)`` then ``("x.weight_scale", scale)``: convert's naming, for engines."""
    for name, t in items:
        if isinstance(t, QuantizedTensor):
            yield name, t.data
            yield name + "_scale", t.scale
        else:
            yield name, t
