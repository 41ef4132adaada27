#!/usr/bin/env python
"""Run a command under a memory limit in a fresh cgroup and report its peak usage.

    python tools/run_capped.py --mem 700M -- python -c "..."

Uses cgroup v2 (``memory.max`` in a child group, where the v2 hierarchy has a memory
controller) or else cgroup v1 (``memory.limit_in_bytes`` in a child of this process's own
memory group, plus ``memory.memsw.limit_in_bytes`` where it exists, so swap is no way
out). The command is moved into the group before it execs; the group counts its
anonymous memory *and* the page cache it brings in (clean pages are reclaimed under the
limit, anonymous memory over it gets the command OOM-killed).

Output: the command's own stdout/stderr, then a human summary on stderr and one JSON line
on stdout (``limit_bytes``, ``peak_bytes``, ``oom_kill``, ``returncode``, ...). The exit code
is the command's (128 + N when signal N killed it: 137 for the OOM killer). Where no
memory cgroup can be made (no controller, not root, ...) it says why and exits with 3
without running the command. The group is removed afterwards; anything the command left
running inside it is killed first. Nothing else is moved between groups.

Sizes: K, M, G, T (and KiB/MiB/GiB, KB/MB/GB) are powers of 1024, as in docker and cgroups.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

EXIT_NO_CGROUP = 3
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


class CgroupUnavailable(RuntimeError):
    """No memory cgroup can be created here; the message says why."""


def parse_mem(text: str) -> int:
    """'700M', '700MiB', '1.5G', '734003200' -> bytes (binary units)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmMgGtT]?)(?:i?[bB])?\s*", text)
    if not m:
        raise ValueError(f"not a memory size: {text!r} (examples: 700M, 1.5G, 512MiB)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def _mounts() -> list[tuple[str, str, str, str]]:
    """(mount root, mount point, fstype, super options) of every mount of this process."""
    out = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        f, r = left.split(), right.split()
        if len(f) >= 5 and len(r) >= 3:
            out.append((f[3], f[4].replace("\\040", " "), r[0], r[2]))
    return out


def _own_groups() -> dict[str, str]:
    """controller list ('' for v2) -> this process's group path, from /proc/self/cgroup."""
    groups = {}
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, ctrl, path = line.split(":", 2)
        groups[ctrl] = path
    return groups


def _under(mount_point: str, mount_root: str, path: str) -> Path:
    rel = path[len(mount_root):] if mount_root != "/" and path.startswith(mount_root) else path
    return Path(mount_point) / rel.lstrip("/")


@dataclass(frozen=True)
class Backend:
    """Where child groups are made: ``kind`` is "v2" or "v1", ``parent`` a group directory."""

    kind: str
    parent: Path

    @property
    def limit_file(self) -> str:
        return "memory.max" if self.kind == "v2" else "memory.limit_in_bytes"


def _v2() -> Backend:
    path = _own_groups().get("")
    mount = next(((r, p) for r, p, fs, _ in _mounts() if fs == "cgroup2"), None)
    if path is None or mount is None:
        raise CgroupUnavailable("no cgroup v2 hierarchy is mounted")
    parent = _under(mount[1], mount[0], path)
    if "memory" not in (parent / "cgroup.controllers").read_text().split():
        raise CgroupUnavailable(f"cgroup v2 at {parent} has no memory controller")
    if "memory" not in (parent / "cgroup.subtree_control").read_text().split():
        try:
            (parent / "cgroup.subtree_control").write_text("+memory")
        except OSError as e:
            raise CgroupUnavailable(f"cannot enable the v2 memory controller for children of {parent} "
                                    f"({e}); processes live in that group (cgroup v2 forbids it) or "
                                    "this user may not write there") from None
    return Backend("v2", parent)


def _v1() -> Backend:
    path = next((p for c, p in _own_groups().items() if "memory" in c.split(",")), None)
    if path is None:
        raise CgroupUnavailable("no cgroup v1 memory controller (no memory line in /proc/self/cgroup)")
    mount = next(((r, p) for r, p, fs, o in _mounts() if fs == "cgroup" and "memory" in o.split(",")),
                 ("/", "/sys/fs/cgroup/memory"))
    parent = _under(mount[1], mount[0], path)
    if not (parent / "memory.limit_in_bytes").exists():
        raise CgroupUnavailable(f"cgroup v1 memory group {parent} not found")
    return Backend("v1", parent)


def find_backend() -> Backend:
    """The first usable of cgroup v2 and v1 (a child group is made and removed to prove it)."""
    reasons = []
    for label, finder in (("v2", _v2), ("v1", _v1)):
        try:
            backend = finder()
            Group(backend, 64 << 20).remove()
            return backend
        except (CgroupUnavailable, OSError) as e:
            reasons.append(f"{label}: {e}")
    raise CgroupUnavailable("; ".join(reasons))


def probe() -> str | None:
    """None when a memory-limited cgroup can be made here, else the reason it cannot."""
    try:
        find_backend()
    except CgroupUnavailable as e:
        return str(e)
    return None


class Group:
    """A child memory cgroup with a limit; ``remove()`` kills what is left in it and rmdirs it."""

    def __init__(self, backend: Backend, limit: int, name: str | None = None):
        self.backend, self.limit = backend, limit
        self.path = backend.parent / (name or f"run_capped-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        self.path.mkdir()
        try:
            self._write(backend.limit_file, limit)
            for extra, value in (("memory.memsw.limit_in_bytes", limit), ("memory.swap.max", 0)):
                if (self.path / extra).exists():
                    self._write(extra, value)
        except BaseException:
            self.path.rmdir()
            raise

    def _write(self, name: str, value) -> None:
        (self.path / name).write_text(f"{value}\n")

    def _read(self, name: str) -> str | None:
        try:
            return (self.path / name).read_text()
        except OSError:
            return None

    def add_self(self) -> None:
        """Move the calling process into the group (called in the child before exec)."""
        with open(self.path / "cgroup.procs", "w") as f:
            f.write(str(os.getpid()))

    def usage(self) -> int:
        text = self._read("memory.current" if self.backend.kind == "v2" else "memory.usage_in_bytes")
        return int(text) if text else 0

    def peak(self) -> int | None:
        text = self._read("memory.peak" if self.backend.kind == "v2" else "memory.max_usage_in_bytes")
        return int(text) if text else None

    def oom_kills(self) -> int:
        text = self._read("memory.events" if self.backend.kind == "v2" else "memory.oom_control") or ""
        m = re.search(r"^oom_kill (\d+)$", text, re.M)
        return int(m.group(1)) if m else 0

    def pids(self) -> list[int]:
        return [int(p) for p in (self._read("cgroup.procs") or "").split()]

    def remove(self, grace_s: float = 1.0) -> None:
        deadline = time.monotonic() + grace_s
        while self.pids() and time.monotonic() < deadline:
            time.sleep(0.02)
        for pid in self.pids():   # left behind by the command: part of what it ran
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for _ in range(250):
            try:
                self.path.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError:   # EBUSY until the killed processes are gone
                time.sleep(0.02)
        self.path.rmdir()


@dataclass
class Result:
    backend: str
    group: str
    limit_bytes: int
    peak_bytes: int | None
    oom_kill: bool
    oom_kill_count: int
    returncode: int
    exit_code: int
    seconds: float
    error: str | None = None


def run_capped(cmd: list[str], limit: int, backend: Backend | None = None, **popen) -> Result:
    """Run ``cmd`` in a new group limited to ``limit`` bytes; wait; remove the group."""
    backend = backend or find_backend()
    group = Group(backend, limit)
    sampled = 0
    try:
        t0 = time.perf_counter()
        try:
            proc = subprocess.Popen(cmd, preexec_fn=group.add_self, **popen)
        except (FileNotFoundError, PermissionError) as e:   # as a shell: 127 / 126
            code = 127 if isinstance(e, FileNotFoundError) else 126
            return Result(backend.kind, str(group.path), limit, 0, False, 0, code, code, 0.0,
                          f"cannot run {cmd[0]!r}: {e.strerror}")
        except subprocess.SubprocessError as e:   # the child could not join the group
            raise CgroupUnavailable(f"cannot move a process into {group.path}: {e}") from None
        # Ctrl-C reaches the command straight from the terminal (same process group): this
        # process waits for it to exit and cleans up. SIGTERM / SIGHUP are passed on.
        forward = lambda sig, _frame: proc.send_signal(sig)  # noqa: E731
        old = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGHUP)}
        old[signal.SIGINT] = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            while proc.poll() is None:
                sampled = max(sampled, group.usage())   # for kernels without a peak file
                time.sleep(0.05)
        finally:
            for s, h in old.items():
                signal.signal(s, h)
        seconds = time.perf_counter() - t0
        rc = proc.returncode
        peak = max(group.peak() or 0, sampled)
        kills = group.oom_kills()
    finally:
        group.remove()
    code = 128 - rc if rc < 0 else rc
    return Result(backend.kind, str(group.path), limit, peak, kills > 0, kills, rc, code, seconds)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 usage="%(prog)s --mem SIZE [--probe] -- CMD [ARG ...]")
    ap.add_argument("--mem", type=parse_mem, help="memory limit, e.g. 700M (binary units)")
    ap.add_argument("--probe", action="store_true", help="only say whether a memory cgroup can be made")
    ap.add_argument("cmd", nargs=argparse.REMAINDER)
    a = ap.parse_args(argv)
    cmd = a.cmd[1:] if a.cmd[:1] == ["--"] else a.cmd
    try:
        backend = find_backend()
    except CgroupUnavailable as e:
        print(f"run_capped: no memory cgroup can be made here: {e}", file=sys.stderr)
        print(json.dumps({"available": False, "reason": str(e)}), flush=True)
        return EXIT_NO_CGROUP
    if a.probe:
        print(json.dumps({"available": True, "backend": backend.kind, "parent": str(backend.parent)}))
        return 0
    if a.mem is None or not cmd:
        ap.error("need --mem SIZE and a command after --")
    try:
        r = run_capped(cmd, a.mem, backend)
    except CgroupUnavailable as e:
        print(f"run_capped: {e}", file=sys.stderr)
        print(json.dumps({"available": False, "reason": str(e)}), flush=True)
        return EXIT_NO_CGROUP
    mib = lambda b: "n/a" if b is None else f"{b / 2**20:.1f} MiB"  # noqa: E731
    if r.error:
        print(f"run_capped: {r.error}", file=sys.stderr)
    print(f"run_capped: cgroup {r.backend} limit {mib(r.limit_bytes)}, peak {mib(r.peak_bytes)}, "
          f"oom_kill {'yes' if r.oom_kill else 'no'}, exit {r.exit_code}, {r.seconds:.2f} s",
          file=sys.stderr, flush=True)
    print(json.dumps({"available": True, **r.__dict__}), flush=True)
    return r.exit_code


if __name__ == "__main__":
    sys.exit(main())
