from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

from mmapload.checkpoint import TensorSpec
from mmapload.errors import OptionsError
from mmapload.plan import ALIGN, plan_batches, split_run


def _specs(shapes, itemsize_dtype="BF16"):
    out, off = [], 100
    for i, shape in enumerate(shapes):
        n = 2
        for d in shape:
            n *= d
        out.append(TensorSpec(f"t{i}.weight", itemsize_dtype, tuple(shape), Path("/x"), off, off + n))
        off += n
    return out


def _check_cover(specs, batches, slot):
    by = {}
    for b in batches:
        assert b.nbytes <= slot
        for p in b.pieces:
            assert p.offset % ALIGN == 0
            by.setdefault(p.spec.name, []).append(p)
    for s in specs:
        ps = by[s.name]
        assert ps[0].first and ps[-1].last
        assert ps[0].lo == s.start and ps[-1].hi == s.end
        assert all(a.hi == b.lo for a, b in zip(ps, ps[1:]))


def test_small_tensors_pack_into_one_slot():
    specs = _specs([(4, 4)] * 10)
    batches = plan_batches(specs, lambda s: True, 4096)
    assert len(batches) == 1 and len(batches[0].pieces) == 10
    _check_cover(specs, batches, 4096)


def test_big_tensor_is_cut_into_row_chunks_on_block_rows():
    specs = _specs([(1000, 64), (3, 3)])        # 128 bytes per row, 128000 bytes
    batches = plan_batches(specs, lambda s: True, 16384, block_rows=32)
    _check_cover(specs, batches, 16384)
    pieces = [p for b in batches for p in b.pieces if p.spec.name == "t0.weight"]
    assert len(pieces) > 4
    assert all(p.row0 % 32 == 0 for p in pieces)
    assert not any(p.whole for p in pieces)


def test_experts_are_cut_per_expert():
    specs = _specs([(4, 8, 16)])
    batches = plan_batches(specs, lambda s: True, 4096)
    pieces = [p for b in batches for p in b.pieces]
    assert [p.expert for p in pieces] == [0, 1, 2, 3] and all(p.whole for p in pieces)
    _check_cover(specs, batches, 4096)


def test_unquantized_big_tensor_cut_by_bytes():
    specs = _specs([(100000,)])
    batches = plan_batches(specs, lambda s: False, 8192)
    _check_cover(specs, batches, 8192)
    assert len(batches) == -(-200000 // 8192)


def test_row_too_big_for_slot_is_an_options_error_naming_tensor():
    specs = _specs([(4, 10000)])
    with pytest.raises(OptionsError, match=r"t0\.weight.*ring_bytes"):
        plan_batches(specs, lambda s: True, 4096)



@settings(max_examples=300, deadline=None)
@given(lo=st.integers(0, 1 << 20), sizes=st.lists(st.integers(0, 3 << 20), min_size=1, max_size=6),
       parts=st.integers(1, 8), min_bytes=st.sampled_from([1, 4096, 1 << 20]))
def test_split_run_covers_every_byte_once_in_order(lo, sizes, parts, min_bytes):
    shares = split_run(lo, sizes, parts, min_bytes)
    total = sum(sizes)
    assert 1 <= len(shares) <= max(1, parts)
    # walk the shares: file offsets are contiguous, destinations are covered in order, once
    at, covered = lo, []
    for k, (off, segs) in enumerate(shares):
        assert off == at
        if k:
            assert off % 4096 == 0                       # cuts on page boundaries
        n = sum(e - s for _, s, e in segs)
        assert n > min(min_bytes, total) - 4096 or k == len(shares) - 1   # less only by the alignment
        covered += segs
        at += n
    assert at == lo + total
    pos = {i: 0 for i in range(len(sizes))}
    for i, s, e in covered:
        assert s == pos[i] and e > s
        pos[i] = e
    assert all(pos[i] == sizes[i] for i in pos)


def test_split_run_makes_equal_shares_of_a_big_run():
    shares = split_run(4096, [4 << 20, 4 << 20], 4)
    assert [off for off, _ in shares] == [4096 + k * (2 << 20) for k in range(4)]
    assert shares[1][1] == [(0, 2 << 20, 4 << 20)]
    assert split_run(0, [1 << 20], 4) == [(0, [(0, 0, 1 << 20)])]   # too small to split
