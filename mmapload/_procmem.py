"""Process memory readings: RSS split into anonymous and file-backed pages.

Linux reports the split in /proc/self/status (RssAnon / RssFile / RssShmem); elsewhere
psutil gives the total only and the split is reported as unknown (None).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import psutil

__all__ = ["MemReading", "read_mem", "fstype", "headroom"]

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


def _cgroup_headroom() -> int | None:
    """Bytes this process's memory cgroup may still grow by (limit - usage), None without a limit."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    best = None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":                      # v2: one unified hierarchy
            base = Path("/sys/fs/cgroup") / path.lstrip("/")
            names = ("memory.max", "memory.current")
        elif "memory" in controllers.split(","):   # v1: the memory controller's own hierarchy
            base = Path("/sys/fs/cgroup/memory") / path.lstrip("/")
            names = ("memory.limit_in_bytes", "memory.usage_in_bytes")
        else:
            continue
        try:
            limit, usage = ((base / n).read_text().strip() for n in names)
        except OSError:
            continue
        if limit == "max" or not limit.isdigit() or int(limit) >= 1 << 60:   # v1 "no limit" is ~2**63
            continue
        room = max(0, int(limit) - int(usage))
        best = room if best is None else min(best, room)
    return best


def headroom() -> int:
    """Bytes this process can still use without pressure: the host's MemAvailable, or less where
    a memory cgroup (a container's limit) leaves less. psutil's figure off Linux."""
    room = psutil.virtual_memory().available
    cg = _cgroup_headroom()
    return room if cg is None else min(room, cg)
