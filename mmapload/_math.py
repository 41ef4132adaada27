"""Integer arithmetic the stages share: one spelling of "round up" instead of ``-(-a // b)``."""

from __future__ import annotations

__all__ = ["ceil_div", "round_up"]


def ceil_div(a: int, b: int) -> int:
    """``ceil(a / b)`` for ints, exactly (no float): ``ceil_div(7, 4) == 2``; ``b`` must be > 0."""
    return -(-a // b)


def round_up(a: int, multiple: int) -> int:
    """The smallest multiple of ``multiple`` >= ``a``: ``round_up(4097, 4096) == 8192``."""
    return ceil_div(a, multiple) * multiple
