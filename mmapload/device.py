"""Moving filled ring slots to the device, and what "device" may be.

On the CPU the slot is where the quantizer runs: no copy, no-op events. With CUDA, a
dedicated copy stream moves each slot into one of two device staging buffers; events gate
both the staging buffers (copy k+1 waits until the quantizer is done with that buffer) and
the ring slots (the reader refills a slot only after its copy event has completed).
"""

from __future__ import annotations

import torch

from .errors import DeviceError
from .ring import Lease

__all__ = ["parse_device", "resolve_device", "mover_class"]

def parse_device(device) -> torch.device:
    """``device`` as a ``torch.device`` of a kind mmapload loads to (cpu, cuda[:N]); it need
    not exist on this machine (``inspect`` plans GPU loads anywhere)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise DeviceError(f"device {device!r} is not a device torch understands: {e}") from None
    if dev.type not in ("cpu", "cuda"):
        raise DeviceError(f"device {device!r}: mmapload supports 'cpu' and 'cuda[:N]'")
    return dev


def resolve_device(device) -> torch.device:
    """``parse_device``, and for CUDA: it is there, with that index."""
    dev = parse_device(device)
    if dev.type == "cpu":
        return dev
    if not torch.cuda.is_available():
        raise DeviceError(f"device {device!r} asked for, but CUDA is not available on this machine "
                          "(no GPU, or a CPU-only torch build); use device='cpu'")
    index = torch.cuda.current_device() if dev.index is None else dev.index
    if index >= torch.cuda.device_count():
        raise DeviceError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s)")
    return torch.device("cuda", index)


class _CpuMover:
    """On the CPU the slot is already where the quantizer runs: no copy, no events."""

    copies = False   # pieces stay in their slots: holding one means keeping its lease
    copy_seconds = 0.0

    def __init__(self, device: torch.device, stage_bytes: int, hold_bytes: int = 0):
        self.device = device

    def to_device(self, lease: Lease) -> torch.Tensor:
        return lease.data

    def hold(self, x: torch.Tensor, elem_offset: int) -> tuple[torch.Tensor, bool]:
        """Keep ``x`` (a piece of a shared scale group) readable until its group is complete:
        on the CPU it stays in its slot (keep the lease)."""
        return x, True

    def done(self, lease: Lease) -> None:
        if not lease.kept:
            lease.release()

    def close(self) -> None:
        pass


class _CudaMover:
    """Pinned slot -> device staging on a copy stream; events gate staging and slot reuse.

    Two staging buffers alternate, so the copy of batch k+1 overlaps the quantization of
    batch k. The slot returns to the reader with the copy's event: the reader waits for
    it before overwriting the slot. Quantization waits for the same event on its stream.
    """

    copies = True    # pieces are copied off the slot: held ones go to a device buffer

    def __init__(self, device: torch.device, stage_bytes: int, hold_bytes: int = 0):
        self.device = device
        # pieces of a scale group (plan.py: a per-tensor matrix, a channel row, a block granule
        # cut into pieces) wait here for the group's amax; sized to the largest group
        self.held = torch.empty(hold_bytes, dtype=torch.uint8, device=device) if hold_bytes else None
        self.compute = torch.cuda.current_stream(device)
        self.copy = torch.cuda.Stream(device)
        self.staging = [torch.empty(stage_bytes, dtype=torch.uint8, device=device) for _ in range(2)]
        self.free = [None, None]   # event: the compute stream is done with staging[k]
        self.k = 0                 # the staging buffer the next copy goes to
        self._timed: list = []     # (start, end) events of every copy, summed at close
        self.copy_seconds = 0.0
        self._buffer_of: dict[int, int] = {}

    def to_device(self, lease: Lease) -> torch.Tensor:
        k, n = self.k, lease.item.nbytes
        self.k ^= 1
        self._buffer_of[id(lease)] = k
        buf = self.staging[k]
        with torch.cuda.stream(self.copy):
            if self.free[k] is not None:
                self.copy.wait_event(self.free[k])
            started = torch.cuda.Event(enable_timing=True)
            started.record(self.copy)
            buf[:n].copy_(lease.data[:n], non_blocking=True)
            copied = torch.cuda.Event(enable_timing=True)
            copied.record(self.copy)
        self._timed.append((started, copied))
        self.compute.wait_event(copied)
        lease.release(copied)
        return buf

    def hold(self, x: torch.Tensor, elem_offset: int) -> tuple[torch.Tensor, bool]:
        """Copy ``x`` out of the staging buffer to ``elem_offset`` (elements of x's dtype from the
        start of its group; a group's pieces lie back to back); the slot can go back now."""
        dst = self.held.view(x.dtype)[elem_offset:elem_offset + x.numel()].view(x.shape)
        dst.copy_(x)
        return dst, False

    def done(self, lease: Lease) -> None:
        ev = torch.cuda.Event()
        ev.record(self.compute)
        self.free[self._buffer_of.pop(id(lease))] = ev

    def close(self) -> None:
        self.compute.synchronize()
        self.copy.synchronize()
        self.copy_seconds = sum(a.elapsed_time(b) for a, b in self._timed) / 1e3
        self._timed, self.staging, self.held = [], [], None


def mover_class(device: torch.device) -> type:
    """The slot mover for ``device``: ``Mover(device, stage_bytes, hold_bytes)`` with
    ``to_device(lease)``, ``hold(x, elem_offset)``, ``done(lease)``, ``close()`` and the
    class attribute ``copies`` (True when pieces are copied off their slots)."""
    return _CudaMover if device.type == "cuda" else _CpuMover
