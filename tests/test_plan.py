import time
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


# -- the load plan: hold / pre-pass boundary --------------------------------------------------

RING = 64 << 10          # 4 slots of 16 KiB (LoadOptions.slot_bytes: a quarter of the ring)


def _spanning(path, k, granularity, slot):
    """A checkpoint whose shared scale granules each span exactly ``k`` full slots: two
    per-tensor bf16 matrices of ``k`` slots of whole rows, or (channel) two 2-row matrices
    ``k`` slots wide, after a small kept tensor. Returns the source tensors."""
    from safetensors.torch import save_file
    g = torch.Generator().manual_seed(k)
    shape = (8 * k, slot // 16) if granularity == "tensor" else (2, k * slot // 2)
    w = torch.randn(*shape, generator=g).bfloat16()
    w.view(-1)[-1] = 50.0                         # the amax sits in the group's last piece
    tensors = {"a.norm.weight": torch.randn(40, generator=g), "m.weight": w, "z.weight": -2 * w}
    save_file(tensors, path)
    return tensors


@pytest.mark.parametrize("granularity", ["tensor", "channel"])
@pytest.mark.parametrize("n_slots", [2, 3, 4, 5, 8])
def test_group_spanning_n_slots_minus_one_is_held_n_slots_prepassed(tmp_path, monkeypatch, granularity,
                                                                    n_slots, no_thread_leak):
    """In place (CPU) a scale group spanning n_slots - 1 batches is held in its slots, one
    spanning n_slots batches is pre-passed by the reader; the load follows the plan and both
    are bit-identical to quantizing the whole tensor. The ring's slot count is varied."""
    import mmapload
    from mmapload import fill, stream
    from mmapload.assemble import Assembler
    from mmapload.fp8 import quantize
    from mmapload.config import LoadConfig, LoadOptions
    monkeypatch.setattr(LoadOptions, "n_slots", property(lambda self: n_slots))
    slot = LoadOptions(ring_bytes=RING).slot_bytes
    prepassed = []
    group_amax = fill.Filler.group_amax
    monkeypatch.setattr(fill.Filler, "group_amax",
                        lambda self, pieces, scratch: prepassed.append(pieces[0].group)
                        or group_amax(self, pieces, scratch))
    add = Assembler.add

    def slow_add(self, *a, **kw):                 # a slow consumer: the reader races ahead, so
        time.sleep(0.001)                         # a held slot refilled too early would show
        return add(self, *a, **kw)
    monkeypatch.setattr(Assembler, "add", slow_add)
    for k, mode in ((n_slots - 1, "held"), (n_slots, "prepass")):
        if k < 2:                                 # one slot's worth is no shared group
            continue
        path = tmp_path / f"{k}.safetensors"
        tensors = _spanning(path, k, granularity, slot)
        pipe = stream.prepare(path, "cpu", LoadConfig(ring_bytes=RING, granularity=granularity))
        plan = pipe.plan
        assert plan.n_slots == n_slots and not plan.copies and plan.into_outputs
        assert set(plan.groups) == plan.held | plan.prepass and not plan.held & plan.prepass
        spans = {g: len({id(b) for b in plan.batches for p in b.pieces if p.group == g})
                 for g in plan.groups}
        assert set(spans.values()) == {k}, spans
        assert getattr(plan, mode) == frozenset(plan.groups), (k, mode)
        prepassed.clear()
        got = dict(stream.results(pipe))
        assert sorted(prepassed) == (sorted(plan.prepass) if mode == "prepass" else [])
        for name in ("m.weight", "z.weight"):
            q, s = quantize(tensors[name], granularity)
            assert torch.equal(got[name].scale, s), name
            assert torch.equal(got[name].data.view(torch.uint8), q.view(torch.uint8)), name
        assert torch.equal(got["a.norm.weight"], tensors["a.norm.weight"])
        assert isinstance(got["m.weight"], mmapload.QuantizedTensor)


def test_copying_device_holds_every_group_in_one_buffer(tmp_path):
    """A CUDA plan (made without a GPU): no pre-pass, a hold buffer of the largest group
    (64-byte rounded), kept tensors through the slot; the same batches as the CPU plan."""
    from mmapload.checkpoint import open_checkpoint
    from mmapload.config import LoadOptions
    from mmapload.plan import plan_load
    path = tmp_path / "m.safetensors"
    _spanning(path, 6, "tensor", LoadOptions(ring_bytes=RING).slot_bytes)
    c, o = open_checkpoint(path), LoadOptions(ring_bytes=RING)
    quantize = lambda s: s.name != "a.norm.weight"   # noqa: E731
    cuda = plan_load(c, quantize, o, torch.device("cuda"))
    cpu = plan_load(c, quantize, o, torch.device("cpu"))
    assert cuda.copies and not cuda.into_outputs and not cuda.prepass and cuda.held == cpu.prepass
    biggest = max(sum(p.nbytes for p in ps) for ps in cuda.groups.values())
    assert cuda.hold_bytes == -(-biggest // 64) * 64 > 0 and cpu.hold_bytes == 0
    assert cuda.batches == cpu.batches and cuda.stage_bytes == max(b.nbytes for b in cpu.batches)
