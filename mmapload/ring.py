"""A bounded ring of staging slots, filled by one reader thread.

One buffer of ``n_slots * slot_bytes`` bytes, allocated once (pinned when CUDA is
available, so host->device copies can be asynchronous DMA), cut into equal slots. The
reader thread takes a free slot, fills it, and hands it to the consumer as a ``Lease``.
This module alone decides when a slot may be refilled: the consumer only tells the lease
facts (its bytes are on the device once an event completes; a scale group's pieces stay in
it; that group is complete; every piece was read), and the slot goes back when nothing reads
it any more. The reader waits for the event it was freed with (the consumer's host->device
copy) before it overwrites the slot. The ring never grows: callers split big tensors.

One thread copying from page cache to memory moves ~5-10 GB/s, less than a PCIe 5 link
takes from pinned memory; ``CopyPool`` lets the reader split one slot's copy over several
threads (memcpy and page faults release the GIL).

This is the only module that starts threads. Every exit of ``staged`` (exhausted,
exception in either thread, generator closed early, KeyboardInterrupt) joins the thread;
``CopyPool.close`` joins its workers.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Generic, Iterable, Iterator, Protocol, TypeVar

import torch

from .errors import warn

__all__ = ["Ring", "Lease", "staged", "StageTimes", "CopyPool"]

T = TypeVar("T")
R = TypeVar("R")


class _Event(Protocol):
    def synchronize(self) -> None: ...


class Ring:
    """``n_slots`` slots of ``slot_bytes`` each in one allocation."""

    def __init__(self, n_slots: int, slot_bytes: int, *, pin: bool = False):
        if n_slots < 2 or slot_bytes < 1:
            raise ValueError(f"a ring needs >= 2 slots of >= 1 byte, got {n_slots} x {slot_bytes}")
        self.n_slots, self.slot_bytes = n_slots, slot_bytes
        self.pinned = False
        nbytes = n_slots * slot_bytes
        if pin:
            try:
                self.buffer = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
                self.pinned = True
            except RuntimeError as e:  # pinned allocations can fail on huge requests
                warn(f"mmapload: pinning a {nbytes}-byte ring failed ({e}); "
                              "using pageable memory (slower host->device copies)")
        if not self.pinned:
            self.buffer = torch.empty(nbytes, dtype=torch.uint8)

    @property
    def nbytes(self) -> int:
        return self.n_slots * self.slot_bytes

    def slot(self, index: int) -> torch.Tensor:
        return self.buffer[index * self.slot_bytes:(index + 1) * self.slot_bytes]


@dataclass
class StageTimes:
    """Seconds spent per stage, summed over a load (reader and consumer threads)."""

    fill: float = 0.0          # reader: copying from the source into slots
    wait_free: float = 0.0     # reader: waiting for a free slot (consumer is the bottleneck)
    wait_ready: float = 0.0    # consumer: waiting for a filled slot (reader is the bottleneck)


@dataclass(eq=False)
class Lease(Generic[T, R]):
    """A filled slot on loan to the consumer. Never hand ``data`` to a caller.

    ``item`` is what was filled, ``prepared`` what ``fill`` returned for it. The consumer
    tells the ring facts about the slot; the ring alone decides when it may be refilled
    (see ``staged``).
    """

    item: T
    data: torch.Tensor         # uint8 view of the slot (whole slot; the item says what is used)
    prepared: R
    _index: int
    _book: "_SlotBook" = field(repr=False)
    freed: bool = False        # the slot went back to the reader
    copied: bool = False       # its bytes were copied off (``on_device``)
    consumed: bool = False     # the consumer read every piece of it (``done``)
    holding: set[int] = field(default_factory=set)   # scale groups still read from the slot

    # -- facts, told by the consumer thread only ------------------------------------------
    def on_device(self, event: _Event | None = None) -> None:
        """Its bytes are on the device once ``event`` completes: the slot is no longer read."""
        if self.holding:
            raise RuntimeError(f"slot {self._index}: copied off while it holds groups {self.holding}")
        self.copied = True
        self._book.settle(self, event)

    def holds(self, group: int) -> None:
        """Pieces of scale group ``group`` stay in this slot until ``group_complete(group)``
        (saying it again for another piece of the group changes nothing)."""
        if group in self.holding:
            return
        if self.freed:
            raise RuntimeError(f"slot {self._index}: already given back, cannot hold group {group}")
        self.holding.add(group)
        self._book.holders.setdefault(group, []).append(self)

    def done(self) -> None:
        """The consumer read every piece of the batch (held groups still count)."""
        self.consumed = True
        self._book.settle(self)

    def group_complete(self, group: int) -> None:
        """Scale group ``group`` has been cast: no slot holds its pieces any more."""
        for lease in self._book.holders.pop(group, ()):
            lease.holding.discard(group)
            lease._book.settle(lease)


class _SlotBook:
    """The consumer's record of leases not yet freed (consumer thread only); the free queue
    is the one thing it shares with the reader."""

    def __init__(self, free: "queue.Queue"):
        self.free = free
        self.holders: dict[int, list[Lease]] = {}
        self.out = 0           # leases handed out and not yet freed

    def settle(self, lease: Lease, event: _Event | None = None) -> None:
        """Free ``lease``'s slot if nothing reads it any more: copied off, or consumed and
        holding no group. The reader waits on ``event`` before refilling it."""
        if lease.freed or lease.holding or not (lease.copied or lease.consumed):
            return
        lease.freed = True
        self.out -= 1
        self.free.put((lease._index, event))


_DONE = object()


class _Failure:
    def __init__(self, exc: BaseException):
        self.exc = exc


def staged(items: Iterable[T], ring: Ring, fill: Callable[[T, torch.Tensor], R],
           times: StageTimes | None = None) -> Iterator[Lease[T, R]]:
    """Yield a ``Lease`` per item, in order, filled by ``fill(item, slot)`` on a reader thread.

    Slot lifetime, decided here and nowhere else. Who may call what:
    - the reader thread (started here) runs ``fill`` and takes only slots the consumer freed,
      after waiting on the event they were freed with;
    - the consumer (the caller of this generator) tells each lease facts, and nothing else:
      ``on_device(event)`` (its bytes are copied off), ``holds(g)`` (a scale group's pieces
      stay in the slot), ``group_complete(g)``, ``done()`` (every piece read).
    A slot is freed once it is copied off, or done with and holding no group: never before
    its consumer has finished with it. Asking for the next lease while every slot is on
    loan raises ``RuntimeError`` (the consumer forgot a fact; it would wait forever).
    """
    times = times if times is not None else StageTimes()
    free: queue.Queue = queue.Queue()
    ready: queue.Queue = queue.Queue()
    stop = threading.Event()
    for i in range(ring.n_slots):
        free.put((i, None))
    book = _SlotBook(free)

    def reader() -> None:
        try:
            for item in items:
                t0 = time.perf_counter()
                got = free.get()
                if got is None or stop.is_set():
                    return
                index, event = got
                if event is not None:
                    event.synchronize()  # the consumer's copy out of this slot has finished
                t1 = time.perf_counter()
                prepared = fill(item, ring.slot(index))
                times.wait_free += t1 - t0
                times.fill += time.perf_counter() - t1
                ready.put((item, index, prepared))
                if stop.is_set():
                    return
            ready.put(_DONE)
        except BaseException as e:  # noqa: BLE001 - surfaced in the consumer
            ready.put(_Failure(e))

    thread = threading.Thread(target=reader, name="mmapload-reader", daemon=True)
    thread.start()
    try:
        while True:
            if book.out >= ring.n_slots:
                raise RuntimeError(f"all {ring.n_slots} ring slots are on loan: a lease was neither "
                                   "copied off nor done, or holds a group never completed")
            t0 = time.perf_counter()
            msg = ready.get()
            times.wait_ready += time.perf_counter() - t0
            if msg is _DONE:
                return
            if isinstance(msg, _Failure):
                raise msg.exc
            item, index, prepared = msg
            book.out += 1
            yield Lease(item, ring.slot(index), prepared, index, book)
    finally:
        stop.set()
        free.put(None)  # wakes a reader blocked on a free slot
        thread.join()


class CopyPool:
    """``n`` threads, the caller's included, running one batch of independent copies.

    ``run(tasks)`` returns when every task has finished and re-raises the first failure.
    With ``n == 1`` it is a plain loop and starts no thread.
    """

    def __init__(self, n: int):
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"a copy pool needs >= 1 thread, got {n!r}")
        self.n = n
        self._jobs: queue.Queue = queue.Queue()
        self._threads = [threading.Thread(target=self._work, name="mmapload-copier", daemon=True)
                         for _ in range(n - 1)]
        for t in self._threads:
            t.start()

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            fn, done = job
            try:
                fn()
            except BaseException as e:  # noqa: BLE001 - re-raised by run() in the caller
                done.put(e)
            else:
                done.put(None)

    def run(self, tasks: list[Callable[[], Any]]) -> None:
        if self.n == 1 or len(tasks) < 2:
            for fn in tasks:
                fn()
            return
        done: queue.Queue = queue.Queue()
        for fn in tasks[1:]:
            self._jobs.put((fn, done))
        errors = []
        try:
            tasks[0]()
        except BaseException as e:  # noqa: BLE001 - after the others finished
            errors.append(e)
        errors += [e for e in (done.get() for _ in tasks[1:]) if e is not None]
        if errors:
            raise errors[0]

    def close(self) -> None:
        for _ in self._threads:
            self._jobs.put(None)
        for t in self._threads:
            t.join()
        self._threads = []

    def __enter__(self) -> "CopyPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
