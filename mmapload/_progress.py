"""A one-line progress display on stderr: bytes done / total, GB/s, ETA (tqdm if installed)."""

from __future__ import annotations

import sys
import time

__all__ = ["Progress"]


class Progress:
    """``update(n)`` as bytes complete; ``close()`` at the end. Silent unless ``enabled``."""

    def __init__(self, total: int, *, enabled: bool, desc: str = "mmapload"):
        self.total, self.enabled, self.desc = total, enabled, desc
        self.done, self._t0, self._last, self._bar = 0, time.perf_counter(), 0.0, None
        if enabled:
            try:
                from tqdm import tqdm
                self._bar = tqdm(total=total, unit="B", unit_scale=True, desc=desc, file=sys.stderr)
            except ImportError:
                pass

    def update(self, n: int) -> None:
        if not self.enabled:
            return
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
            return
        now = time.perf_counter()
        if now - self._last >= 0.2 or self.done >= self.total:
            self._last = now
            rate = self.done / max(now - self._t0, 1e-9)
            eta = (self.total - self.done) / rate if rate > 0 else 0.0
            sys.stderr.write(f"\r{self.desc}: {self.done / 1e9:.2f}/{self.total / 1e9:.2f} GB "
                             f"{rate / 1e9:.2f} GB/s ETA {eta:.0f} s ")
            sys.stderr.flush()

    def close(self) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.close()
        else:
            sys.stderr.write("\n")
            sys.stderr.flush()
