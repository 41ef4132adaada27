"""Moving filled ring slots to the device, and what "device" may be.

Both movers implement ``Mover``. On the CPU the slot is where the quantizer runs: no copy.
With CUDA, a dedicated copy stream moves each slot into one of two device staging buffers;
an event gates the staging buffers (copy k+1 waits until the quantizer is done with that
buffer). A mover never gives a slot back: it tells the ring the fact (``lease.on_device(
event)``: the batch's bytes are on the device once the event completes) and ring.py decides.
"""

from __future__ import annotations

import torch

from typing import Protocol

from .errors import DeviceError
from .ring import Lease

__all__ = ["parse_device", "resolve_device", "mover_class", "copies", "Mover"]


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


class Mover(Protocol):
    """Moves filled slots to the device; made as ``Mover(device, stage_bytes, hold_bytes)``
    (bytes: the largest batch, the hold buffer). Consumer thread only."""

    copies: bool           # class attribute: pieces are copied off their slots
    copy_seconds: float    # host->device copy time, summed at ``close``

    def to_device(self, lease: Lease) -> torch.Tensor:
        """The batch's bytes (uint8, >= ``lease.item.nbytes``) where the quantizer runs; a
        copying mover tells ``lease.on_device(event)``."""
        ...

    def hold(self, x: torch.Tensor, elem_offset: int) -> torch.Tensor:
        """``x`` (a piece of a shared scale group) readable until its group is complete;
        ``elem_offset``: elements of x's dtype from the start of its group."""
        ...

    def done(self, lease: Lease) -> None:
        """The quantizer has queued all its work on the batch's device bytes."""
        ...

    def close(self) -> None: ...


class _CpuMover:
    """On the CPU the slot is already where the quantizer runs: no copy, no events."""

    copies = False   # pieces stay in their slots: holding one means keeping its lease
    copy_seconds = 0.0

    def __init__(self, device: torch.device, stage_bytes: int, hold_bytes: int = 0):
        self.device = device

    def to_device(self, lease: Lease) -> torch.Tensor:
        return lease.data

    def hold(self, x: torch.Tensor, elem_offset: int) -> torch.Tensor:
        """``x`` stays in its slot: the assembler tells the ring (``lease.holds``)."""
        return x

    def done(self, lease: Lease) -> None:
        pass

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
        lease.on_device(copied)
        return buf

    def hold(self, x: torch.Tensor, elem_offset: int) -> torch.Tensor:
        """Copy ``x`` out of the staging buffer to ``elem_offset`` (elements of x's dtype from the
        start of its group; a group's pieces lie back to back)."""
        dst = self.held.view(x.dtype)[elem_offset:elem_offset + x.numel()].view(x.shape)
        dst.copy_(x)
        return dst

    def done(self, lease: Lease) -> None:
        ev = torch.cuda.Event()
        ev.record(self.compute)
        self.free[self._buffer_of.pop(id(lease))] = ev

    def close(self) -> None:
        self.compute.synchronize()
        self.copy.synchronize()
        self.copy_seconds = sum(a.elapsed_time(b) for a, b in self._timed) / 1e3
        self._timed, self.staging, self.held = [], [], None


def mover_class(device: torch.device) -> type[Mover]:
    """The ``Mover`` class for ``device`` (cpu or cuda; it need not exist here)."""
    return _CudaMover if device.type == "cuda" else _CpuMover


def copies(device: torch.device) -> bool:
    """Whether a load to ``device`` copies pieces off their slots (the one place that says)."""
    return mover_class(device).copies
