import threading
import time

import pytest
import torch

from mmapload.ring import Ring, staged


def _fill(item, slot):
    slot[:4].copy_(torch.tensor(list(item.to_bytes(4, "little")), dtype=torch.uint8))
    return item * 10


def test_yields_every_item_in_order_with_extra(no_thread_leak):
    ring = Ring(3, 64)
    got = [(lease.item, int.from_bytes(bytes(lease.data[:4].tolist()), "little"), lease.extra)
           for lease in staged(range(20), ring, _fill)]
    assert got == [(i, i, i * 10) for i in range(20)]


def test_slot_not_refilled_before_release_event():
    """The reader must wait for the consumer's event before overwriting a slot."""
    ring = Ring(2, 16)

    class SlowEvent:
        done = False

        def synchronize(self):
            time.sleep(0.02)
            self.done = True

    by_slot, checks, seen = {}, [], []

    def fill(item, slot):
        ev = by_slot.get(slot.data_ptr())
        if ev is not None:
            checks.append(ev.done)
        slot[0] = item

    for lease in staged(range(8), ring, fill):
        seen.append(int(lease.data[0]))
        ev = SlowEvent()
        by_slot[lease.data.data_ptr()] = ev
        lease.release(ev)
    assert seen == list(range(8))
    assert len(checks) >= 5 and all(checks)


def test_reader_exception_surfaces_in_consumer(no_thread_leak):
    def fill(item, slot):
        if item == 3:
            raise OSError("disk on fire")
        return None

    with pytest.raises(OSError, match="disk on fire"):
        for _ in staged(range(10), Ring(2, 8), fill):
            pass


def _readers():
    return [t for t in threading.enumerate() if t.name == "mmapload-reader"]


def test_early_close_joins_reader(no_thread_leak):
    filled = []
    gen = staged(range(1000), Ring(2, 8), lambda i, s: filled.append(i))
    assert next(gen).item == 0 and len(_readers()) == 1   # the reader runs ahead ...
    gen.close()
    assert _readers() == []                               # ... and close() has joined it, not left it
    assert len(filled) < 1000                             # stopped early, not drained to the end


def test_consumer_exception_joins_reader(no_thread_leak):
    with pytest.raises(RuntimeError):
        for lease in staged(range(1000), Ring(2, 8), lambda i, s: None):
            if lease.item == 2:
                raise RuntimeError("consumer failed")


def test_ring_rejects_too_few_slots():
    with pytest.raises(ValueError):
        Ring(1, 64)


def test_copy_pool_runs_every_task_and_reraises_the_first_failure(no_thread_leak):
    import threading
    from mmapload.ring import CopyPool
    with CopyPool(3) as pool:
        seen, lock = [], threading.Lock()

        def task(i):
            def run():
                time.sleep(0.001 * (i % 3))
                with lock:
                    seen.append((i, threading.current_thread().name))
            return run

        pool.run([task(i) for i in range(9)])
        assert sorted(i for i, _ in seen) == list(range(9))
        assert len({name for _, name in seen}) > 1          # the work was shared

        def boom():
            raise OSError("disk gone")
        seen.clear()
        with pytest.raises(OSError, match="disk gone"):
            pool.run([task(0), boom, task(2), task(3)])
        assert sorted(i for i, _ in seen) == [0, 2, 3]        # the others still finished
    with pytest.raises(ValueError):
        CopyPool(0)
