"""Process memory readings: RSS split into anonymous and file-backed pages.

Linux reports the split in /proc/self/status (RssAnon / RssFile / RssShmem); elsewhere
psutil gives the total only and the split is reported as unknown (None).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import psutil

__all__ = ["MemReading", "read_mem", "fstype"]

_STATUS = "/proc/self/status"
_KEYS = {"VmRSS:": "rss", "RssAnon:": "anon", "RssFile:": "file", "RssShmem:": "shmem"}


@dataclass(frozen=True)
class MemReading:
    rss: int                 # resident bytes
    anon: int | None         # anonymous resident bytes (heap, ring buffer, tensors)
    file: int | None         # file-backed resident bytes (mapped shard pages, libraries)


def read_mem() -> MemReading:
    """One reading of this process's resident memory, in bytes."""
    try:
        with open(_STATUS, "rb") as f:
            text = f.read().decode("ascii", "replace")
    except OSError:
        return MemReading(psutil.Process().memory_info().rss, None, None)
    vals: dict[str, int] = {}
    for line in text.splitlines():
        key = _KEYS.get(line.split(" ", 1)[0].split("\t", 1)[0])
        if key:
            vals[key] = int(line.split()[1]) * 1024
    if "rss" not in vals:
        return MemReading(psutil.Process().memory_info().rss, None, None)
    return MemReading(vals["rss"], vals.get("anon"), vals.get("file"))


def fstype(path) -> str:
    """Filesystem type holding ``path`` (longest mount-point prefix in /proc/self/mountinfo), or "?"."""
    best, kind = "", "?"
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                left, right = line.split(" - ", 1)
                mount = left.split()[4]
                if str(Path(path).resolve()).startswith(mount) and len(mount) > len(best):
                    best, kind = mount, right.split()[0]
    except OSError:
        pass
    return kind
