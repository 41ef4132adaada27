"""Phase marks: the core says where a load is ("open", "read", "quantize", "done"); whoever
listens (the memory sampler of ``mmapload.bench``, while it runs) records it.

The core imports this module only; it knows nothing of samplers. ``mark`` costs one tuple
read when nobody listens.
"""

from __future__ import annotations

import threading
from typing import Callable

__all__ = ["mark", "listen", "unlisten"]

_listeners: tuple[Callable[[str], None], ...] = ()
_lock = threading.Lock()


def mark(phase: str) -> None:
    """Tell every listener the load entered ``phase``; a no-op when none listens."""
    for listener in _listeners:   # a tuple swapped whole under the lock: safe to read without it
        listener(phase)


def listen(listener: Callable[[str], None]) -> None:
    """Call ``listener(phase)`` on every ``mark`` until ``unlisten(listener)``."""
    global _listeners
    with _lock:
        _listeners = _listeners + (listener,)


def unlisten(listener: Callable[[str], None]) -> None:
    global _listeners
    with _lock:
        _listeners = tuple(f for f in _listeners if f != listener)
