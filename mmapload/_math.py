"""Integer arithmetic the stages share: one spelling of "round up" instead of ``-(-a // b)``."""

from __future__ import annotations

__all__ = ["ceil_div", "round_up", "as_int"]


def ceil_div(a: int, b: int) -> int:
    """``ceil(a / b)`` for ints, exactly (no float): ``ceil_div(7, 4) == 2``; ``b`` must be > 0."""
    return -(-a // b)


def round_up(a: int, multiple: int) -> int:
    """The smallest multiple of ``multiple`` >= ``a``: ``round_up(4097, 4096) == 8192``."""
    return ceil_div(a, multiple) * multiple


def as_int(value) -> int | None:
    """``value`` as an int where it is one (int, numpy int: anything with ``__index__``), else None;
    bools are None too (``True`` is an int to Python, never a size or a count to us)."""
    if isinstance(value, bool):
        return None
    try:
        return value.__index__()
    except (AttributeError, TypeError):
        return None
