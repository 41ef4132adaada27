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
    got = []
    for lease in staged(range(20), ring, _fill):
        got.append((lease.item, int.from_bytes(bytes(lease.data[:4].tolist()), "little"), lease.prepared))
        lease.done()
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
        lease.on_device(ev)
    assert seen == list(range(8))
    assert len(checks) >= 5 and all(checks)


def test_reader_exception_surfaces_in_consumer(no_thread_leak):
    def fill(item, slot):
        if item == 3:
            raise OSError("disk on fire")
        return None

    with pytest.raises(OSError, match="disk on fire"):
        for lease in staged(range(10), Ring(2, 8), fill):
            lease.done()
    assert _readers() == []


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
            lease.done()
    assert _readers() == []


def _instrumented(n_slots):
    """A ring whose fill records, per slot, whether the consumer was done with its last
    batch: ``refilled`` lists (item, slot, previous item, previous consumer finished)."""
    ring = Ring(n_slots, 8)
    last, finished, refilled = {}, set(), []

    def fill(item, slot):
        index = slot.data_ptr() - ring.buffer.data_ptr()
        if index in last:
            refilled.append((item, index, last[index], last[index] in finished))
        last[index] = item
        time.sleep(0.0005)

    return ring, fill, finished, refilled


def test_slot_never_refilled_before_its_consumer_is_done(no_thread_leak):
    """Batches hold scale groups over several slots, as the CPU assembler does: a slot goes
    back only when its batch is done AND every group it holds is complete."""
    ring, fill, finished, refilled = _instrumented(4)
    # groups: items 3-5 share group 1, items 10-12 group 2, item 20 alone holds group 3
    group_of = {3: 1, 4: 1, 5: 1, 10: 2, 11: 2, 12: 2, 20: 3}
    last_of = {1: 5, 2: 12, 3: 20}
    for lease in staged(range(40), ring, fill):
        time.sleep(0.001)                        # a slow consumer: the reader races ahead
        g = group_of.get(lease.item)
        last = g is None or lease.item == last_of[g]
        # the consumer's work, recorded before it tells the ring (which may free slots at once)
        if last:
            finished.update(k for k, h in group_of.items() if h == g)   # the group is cast
            finished.add(lease.item)
        if g is not None:
            lease.holds(g)
            if last:
                lease.group_complete(g)
        lease.done()
    assert len(refilled) == 40 - 4
    assert all(ok for *_, ok in refilled), [r for r in refilled if not r[3]]
    assert {prev for _, _, prev, _ in refilled} >= {3, 4, 10, 11}   # held slots did come back


def test_slot_of_a_done_batch_is_kept_while_it_holds_a_group(no_thread_leak):
    ring = Ring(3, 8)
    gen = staged(range(10), ring, lambda i, s: None)
    first = next(gen)
    first.holds(7)
    first.done()
    assert not first.freed                       # done, but group 7 is still read from it
    second = next(gen)
    second.holds(7)
    second.done()
    third = next(gen)
    third.group_complete(7)
    assert first.freed and second.freed and not third.freed
    third.done()
    assert third.freed
    gen.close()


def test_copied_off_slot_may_not_hold_a_group(no_thread_leak):
    gen = staged(range(4), Ring(2, 8), lambda i, s: None)
    lease = next(gen)
    lease.on_device(None)
    assert lease.freed
    with pytest.raises(RuntimeError, match="already given back"):
        lease.holds(1)
    gen.close()


def test_asking_for_a_lease_with_every_slot_on_loan_raises(no_thread_leak):
    """A consumer that forgets to tell a fact would wait forever on a full ring."""
    with pytest.raises(RuntimeError, match="all 2 ring slots are on loan"):
        for _ in staged(range(10), Ring(2, 8), lambda i, s: None):
            pass
    assert _readers() == []


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
