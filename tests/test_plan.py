from pathlib import Path

import pytest
import torch
from hypothesis import given, settings, strategies as st

from mmapload.checkpoint import TensorSpec
from mmapload.fill import split_run
from mmapload.plan import ALIGN, plan_batches


def _specs(shapes, itemsize_dtype="BF16"):
    out, off = [], 100
    for i, shape in enumerate(shapes):
        n = {"F32": 4, "F64": 8}.get(itemsize_dtype, 2)
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
    batches = plan_batches(specs, lambda s: True, 16384, "block", (32, 32))
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


def test_row_wider_than_a_slot_is_cut_into_columns():
    specs = _specs([(4, 10000)])                # 20000-byte rows, 4096-byte slots
    t = [p for b in plan_batches(specs, lambda s: True, 4096, "tensor") for p in b.pieces]
    assert {p.row1 - p.row0 for p in t} == {1} and len({p.group for p in t}) == 1   # one scale group
    assert t[0].group_first and t[-1].group_last and not any(p.group_last for p in t[:-1])
    ch = [p for b in plan_batches(specs, lambda s: True, 4096, "channel") for p in b.pieces]
    assert [p.col1 - p.col0 for p in ch[:5]] == [2000] * 5 and len({p.group for p in ch}) == 4   # a row each
    bl = [p for b in plan_batches(specs, lambda s: True, 4096, "block") for p in b.pieces]
    assert all(p.group == -1 and p.col0 % 128 == 0 and p.stride == 20000 for p in bl)   # independent
    _check_cover(specs, plan_batches(specs, lambda s: True, 4096, "tensor"), 4096)


@pytest.mark.parametrize("shape,granularity", [((1, 4194305), "tensor"), ((1, 4194305), "channel"),
                                               ((1, 4194305), "block"), ((128, 32769), "block")])
def test_rows_wider_than_the_largest_slot_are_planned(shape, granularity):
    """These raised "raise ring_bytes to at least N", which no ring size could satisfy."""
    specs = _specs([shape], "F32")
    slot = 16 << 20
    pieces = [p for b in plan_batches(specs, lambda s: True, slot, granularity) for p in b.pieces]
    assert len(pieces) >= 2 and all(p.nbytes <= slot for p in pieces)
    assert sum(p.nbytes for p in pieces) == specs[0].nbytes
    if granularity == "block":                   # whole 128-column blocks: no shared scales
        assert all(p.group == -1 and p.col0 % 128 == 0 for p in pieces)


@settings(max_examples=300, deadline=None)
@given(experts=st.integers(1, 2), rows=st.integers(1, 300), cols=st.integers(1, 3000),
       dtype=st.sampled_from(["BF16", "F32", "F64"]), slot=st.sampled_from([4096, 8192, 65536]),
       granularity=st.sampled_from(["tensor", "channel", "block"]),
       block=st.sampled_from([(128, 128), (1, 4096), (3, 7), (512, 16), (2, 1)]))
def test_pieces_tile_each_matrix_along_its_scale_granules(experts, rows, cols, dtype, slot, granularity,
                                                          block):
    from mmapload.fp8 import granule
    size = {"BF16": 2, "F32": 4, "F64": 8}[dtype]
    shape = (experts, rows, cols) if experts > 1 else (rows, cols)
    spec = TensorSpec("w.weight", dtype, shape, Path("/x"), 64, 64 + experts * rows * cols * size)
    pieces = [p for b in plan_batches([spec], lambda s: True, slot, granularity, block) for p in b.pieces]
    gr, gc = granule((rows, cols), granularity, block)
    seen = torch.zeros(experts, rows, cols, dtype=torch.int32)
    groups = {}
    for i, p in enumerate(pieces):
        assert p.nbytes <= slot and p.nbytes == (p.row1 - p.row0) * (p.col1 - p.col0) * size
        seen[p.expert, p.row0:p.row1, p.col0:p.col1] += 1
        base = spec.start + p.expert * rows * cols * size   # the file bytes are the rectangle's rows
        rows_ = [(base + (r * cols + p.col0) * size, base + (r * cols + p.col1) * size)
                 for r in range(p.row0, p.row1)]
        assert p.ranges() == (rows_ if p.stride else [(rows_[0][0], rows_[-1][1])])
        assert p.release_to <= min([p.hi] + [q.lo for q in pieces[i + 1:]])
        if p.group < 0:                            # its own granules: cut on granule edges
            assert p.row0 % gr == 0 and (p.row1 % gr == 0 or p.row1 == rows)
            assert p.col0 % gc == 0 and (p.col1 % gc == 0 or p.col1 == cols)
        else:                                      # inside one granule, shared with its group
            assert p.row0 // gr == (p.row1 - 1) // gr and p.col0 // gc == (p.col1 - 1) // gc
            groups.setdefault(p.group, []).append(i)
    assert bool((seen == 1).all())
    for idx in groups.values():
        assert idx == list(range(idx[0], idx[-1] + 1)) and len(idx) > 1   # consecutive
        assert pieces[idx[0]].group_first and pieces[idx[-1]].group_last
        assert not any(pieces[i].group_first or pieces[i].group_last for i in idx[1:-1])


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
