"""The tensor-parallel process group as a load uses it: which rank this is, and the load's few
collectives, each with a timeout, a failure or timeout a ``TPError`` (never a hang).

A load runs, on every rank, the same sequence of collectives: one check that all ranks planned
the same load (``check_same``), at most one MAX all-reduce of amaxes per ring batch (``max_``,
assemble.py), one last ``finish`` so that no rank reports success when another failed. The plans
of the ranks have the same structure (equal slices; tp.py), so the sequences match.
"""

from __future__ import annotations

import datetime
import hashlib
import time
import weakref

import torch

from .errors import OptionsError, TPError

__all__ = ["TPGroup"]

# Groups a load left between its first and last collective (an error, an early close): the ranks'
# sequences of collectives are out of step there, and gloo aborts the process on the next mismatch.
_LEFT_MID_LOAD: "weakref.WeakSet" = weakref.WeakSet()


class TPGroup:
    """``group`` (a ``torch.distributed`` ProcessGroup) of ``size`` ranks, this process ``rank``.
    ``device``: where the collectives' tensors live (CUDA for NCCL, else the CPU)."""

    def __init__(self, group, rank: int, size: int, timeout: float, device: torch.device):
        self.group, self.rank, self.size = group, rank, size
        self.timeout = datetime.timedelta(seconds=timeout)
        self.device = device
        self.count = 0          # collectives run
        self.seconds = 0.0      # spent waiting in them
        self.open = False       # between the first collective of a load and its last

    def left(self) -> None:
        """The load stops here: if it stopped between its collectives, the group is unusable."""
        if self.open:
            _LEFT_MID_LOAD.add(self.group)

    @classmethod
    def resolve(cls, config, device: torch.device) -> "TPGroup | None":
        """The group of ``config`` (``tp_size``, ``tp_rank``, ``process_group``, ``tp_timeout``);
        None without tensor parallelism. OptionsError when the group does not match the options."""
        if config.tp_size == 1 and config.process_group is None:
            return None
        import torch.distributed as dist
        group = config.process_group
        if group is None:
            if not (dist.is_available() and dist.is_initialized()):
                raise OptionsError(f"tp_size={config.tp_size} needs torch.distributed: call "
                                   "torch.distributed.init_process_group first (torchrun does the "
                                   "rendezvous), or pass process_group=")
            group = dist.group.WORLD
        size, rank = dist.get_world_size(group), dist.get_rank(group)
        if size != config.tp_size:
            raise OptionsError(f"tp_size={config.tp_size} but the process group has {size} ranks; pass "
                               f"tp_size={size} or a group of {config.tp_size}")
        if config.tp_rank is not None and config.tp_rank != rank:
            raise OptionsError(f"tp_rank={config.tp_rank} but this process is rank {rank} of its group; "
                               "leave tp_rank=None (the group's rank)")
        if group in _LEFT_MID_LOAD:
            raise TPError("an earlier load on this process group stopped between its collectives (it failed "
                          "or was closed early), so the ranks' collectives are out of step: "
                          "torch.distributed.destroy_process_group() and init_process_group() again (or use a "
                          "new group) before loading again")
        backend = str(dist.get_backend(group)).lower()
        on = device if device.type == "cuda" and "nccl" in backend else torch.device("cpu")
        return cls(group, rank, size, config.tp_timeout, on)

    def _run(self, t: torch.Tensor, what: str) -> torch.Tensor:
        """MAX all-reduce of ``t`` (in place on ``self.device``), bounded by the timeout."""
        import torch.distributed as dist
        t0 = time.perf_counter()
        self.open = True
        try:
            work = dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group, async_op=True)
            work.wait(self.timeout)
        except RuntimeError as e:   # DistBackendError, gloo's timeouts and closed connections
            waited = time.perf_counter() - t0
            why = (f"another rank stalled for over {self.timeout.total_seconds():g} s, or a slow rank needs a "
                   "longer tp_timeout" if waited >= 0.9 * self.timeout.total_seconds() else
                   f"another rank left after {waited:.1f} s (it failed or was stopped: its own error says why)")
            raise TPError(f"rank {self.rank} of tp_size={self.size}: {what} failed: {str(e).strip()[:300]}; "
                          f"{why}") from None
        finally:
            self.count += 1
            self.seconds += time.perf_counter() - t0
        return t

    def max_(self, flat: torch.Tensor, what: str) -> torch.Tensor:
        """The elementwise MAX of float32 ``flat`` over the ranks (a new tensor on ``flat``'s device)."""
        return self._run(flat.to(self.device, copy=True), what).to(flat.device)

    def check_same(self, fingerprint: str, what: str) -> None:
        """TPError unless every rank passes the same ``fingerprint`` (one collective)."""
        h = int.from_bytes(hashlib.blake2b(fingerprint.encode(), digest_size=8).digest(), "little") >> 2
        got = self._run(torch.tensor([h, -h], dtype=torch.int64, device=self.device), what).tolist()
        if got[0] != -got[1]:
            self.open = False   # every rank stops here, in step: the group stays usable
            raise TPError(f"rank {self.rank} of tp_size={self.size}: the ranks planned different loads ({what}); "
                          "pass the same checkpoint and options (ring_bytes, granularity, fp8_dtype, skip, "
                          "tp_plan, ...) on every rank")

    def finish(self) -> None:
        """The last collective: every rank got here (a rank that failed never does)."""
        self._run(torch.zeros(1, device=self.device), "the end-of-load check")
        self.open = False
