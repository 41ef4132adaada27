"""FP8 scaling schemes: how a ``[rows, cols]`` weight is cut into scale granules, as small
frozen dataclasses carrying their parameters (torchao style): ``PerTensor()``, ``PerChannel()``,
``PerBlock(rows=128, cols=128)``. ``as_scheme`` is the one parser of the public spellings
(``granularity="tensor" | "channel" | "block"`` or a ``Granularity`` with ``block_size``, or a
scheme object). Pure arithmetic on shapes; fp8.py does the numerics and re-exports these."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import ClassVar

from mmapload._math import as_int
from mmapload.errors import OptionsError

__all__ = ["Granularity", "Scheme", "PerTensor", "PerChannel", "PerBlock", "DEFAULT_BLOCK", "as_scheme",
           "parse_granularity"]


class Granularity(str, enum.Enum):
    TENSOR = "tensor"
    CHANNEL = "channel"
    BLOCK = "block"


DEFAULT_BLOCK = (128, 128)   # DeepSeek-V3 / vLLM block-scaled FP8


class Scheme:
    """How a weight is cut into scale granules. ``name``: "tensor" | "channel" | "block"."""
    name: ClassVar[str]

    @property
    def granularity(self) -> Granularity:
        return Granularity(self.name)

    def granule(self, rows: int, cols: int) -> tuple[int, int]:
        """(rows, cols) of one granule of a ``[rows, cols]`` matrix (the plan cuts by them too)."""
        raise NotImplementedError

    def grid(self, rows: int, cols: int) -> tuple[int, int]:
        """Shape of a ``[rows, cols]`` matrix's scale grid."""
        gr, gc = self.granule(rows, cols)
        return -(-rows // gr), -(-cols // gc)

    def scale_shape(self, shape) -> tuple[int, ...]:
        """float32 scale shape of a weight of ``shape`` (rank >= 2, else OptionsError): leading
        dims + the grid; a 2-D weight's per-tensor scale is 0-d."""
        shape = tuple(int(d) for d in shape)
        if len(shape) < 2:
            raise OptionsError(f"only tensors of rank >= 2 are quantized, got shape {list(shape)}")
        grid = self.grid(*shape[-2:])
        return shape[:-2] + grid if len(shape) > 2 or self.name != "tensor" else ()


@dataclass(frozen=True)
class PerTensor(Scheme):
    """One scale per matrix: scale ``lead + (1, 1)``, 0-d for a 2-D weight."""
    name: ClassVar[str] = "tensor"

    def granule(self, rows, cols):
        return max(rows, 1), max(cols, 1)

    def grid(self, rows, cols):
        return 1, 1


@dataclass(frozen=True)
class PerChannel(Scheme):
    """One scale per output row: scale ``lead + (rows, 1)``."""
    name: ClassVar[str] = "channel"

    def granule(self, rows, cols):
        return 1, max(cols, 1)

    def grid(self, rows, cols):
        return rows, 1


@dataclass(frozen=True)
class PerBlock(Scheme):
    """One scale per ``rows x cols`` block (ragged edge blocks included): scale ``lead +
    (ceil(R / rows), ceil(C / cols))``. ``rows``, ``cols``: positive ints (numpy ints too)."""
    rows: int = DEFAULT_BLOCK[0]
    cols: int = DEFAULT_BLOCK[1]
    name: ClassVar[str] = "block"

    def __post_init__(self) -> None:
        br, bc = _positive_pair((self.rows, self.cols), "PerBlock(rows, cols)")
        object.__setattr__(self, "rows", br)
        object.__setattr__(self, "cols", bc)

    @property
    def block(self) -> tuple[int, int]:
        return self.rows, self.cols

    def granule(self, rows, cols):
        return self.rows, self.cols


def _positive_pair(value, what: str = "block_size") -> tuple[int, int]:
    """Two positive ints (numpy ints too; no bools, no floats), else an OptionsError."""
    try:
        br, bc = (as_int(v) for v in value)
        if br > 0 and bc > 0:
            return br, bc
    except (AttributeError, TypeError, ValueError):
        pass
    raise OptionsError(f"{what} must be two positive ints (rows, cols), e.g. (128, 128); got {value!r}")


def parse_granularity(value) -> Granularity:
    """The ``Granularity`` of a spelling ("tensor" | "channel" | "block", any case), a member or
    a scheme; anything else is an OptionsError."""
    if isinstance(value, Scheme):
        return value.granularity
    if isinstance(value, Granularity):
        return value
    if isinstance(value, str):
        try:
            return Granularity(value.strip().lower())
        except ValueError:
            pass
    raise OptionsError(f"unknown granularity {value!r}; use granularity='tensor', 'channel' or 'block' "
                       "(or a PerTensor() / PerChannel() / PerBlock(rows, cols) scheme)")


def as_scheme(granularity="tensor", block_size=DEFAULT_BLOCK) -> Scheme:
    """THE parser of the public spellings: a scheme object as it is, or ``granularity``
    ("tensor" | "channel" | "block" | a ``Granularity``) with ``block_size`` (two positive ints,
    the block of "block"). ``block_size`` is checked whatever the granularity; a ``PerBlock``
    with another explicit ``block_size`` than its own is an OptionsError (ambiguous)."""
    bs = _positive_pair(block_size)
    if isinstance(granularity, Scheme):
        if isinstance(granularity, PerBlock) and bs not in (DEFAULT_BLOCK, granularity.block):
            raise OptionsError(f"granularity={granularity!r} and block_size={tuple(bs)} disagree; "
                               "pass the block once, e.g. granularity=PerBlock(rows, cols)")
        return granularity
    g = parse_granularity(granularity)
    return PerBlock(*bs) if g is Granularity.BLOCK else PerChannel() if g is Granularity.CHANNEL else PerTensor()
