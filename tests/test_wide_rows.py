"""Rows (or block bands) wider than a ring slot: pieces cut columns too, and the results stay
bit-identical to quantizing each whole tensor at once (issue 12)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from mmapload import QuantizedTensor, stream_quantize
from mmapload import transfer as device_mod
from mmapload.fp8 import quantize

from test_device import _EmulatedDmaMover

TINY = 64 << 10     # 16 KiB slots, 4 of them: a group spanning more than 3 batches is pre-passed
MID = 256 << 10     # 64 KiB slots


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    g = torch.Generator().manual_seed(21)
    t = {
        "a.wide.weight": torch.randn(3, 17000, generator=g),                     # F32, 68000-byte rows
        "x.bias": torch.randn(100, generator=g).bfloat16(),
        "b.ragged.weight": torch.randn(200, 1100, generator=g).bfloat16(),       # ragged blocks both ways
        "n.norm.weight": torch.randn(17000, generator=g),                        # kept, cut by bytes
        "c.experts.weight": (torch.randn(2, 3, 20000, generator=g) * 4).half(),  # MoE, 40000-byte rows
        "d.f32block.weight": torch.randn(130, 300, generator=g),                 # F32 128x128 block: 64 KiB
        "e.short.weight": torch.randn(1, 6000, generator=g),                     # one 24000-byte row
    }
    # amaxes in late pieces of a row / granule / matrix: an early cast would saturate them
    t["a.wide.weight"][2, 16999] = 99.0
    t["a.wide.weight"][0, 9000] = -30.0
    t["b.ragged.weight"][199, 1099] = 55.0
    t["c.experts.weight"][1, 2, 19999] = -70.0
    t["d.f32block.weight"][127, 127] = 40.0
    t["e.short.weight"][0, 5999] = 12.0
    path = tmp_path_factory.mktemp("wide") / "m.safetensors"
    save_file(t, path)
    return path, t


def _assert_exact(model, tensors, granularity, fp8, block_size=(128, 128)):
    for name, w in tensors.items():
        got = model[name]
        if name.endswith("bias") or "norm" in name:
            assert torch.equal(got, w), name
            continue
        q, s = quantize(w, granularity, fp8, block_size)
        assert isinstance(got, QuantizedTensor), name
        assert got.scale.shape == s.shape and torch.equal(got.scale, s), name
        assert torch.equal(got.data.view(torch.uint8), q.view(torch.uint8)), name


@pytest.mark.parametrize("ring", [TINY, MID])
@pytest.mark.parametrize("io", ["mmap", "pread", "direct", "view"])
@pytest.mark.parametrize("fp8", [torch.float8_e4m3fn, torch.float8_e5m2])
@pytest.mark.parametrize("granularity", ["tensor", "channel", "block"])
def test_wide_rows_equal_the_whole_tensor_quantizer(ckpt, granularity, fp8, io, ring, no_thread_leak):
    path, tensors = ckpt
    model = stream_quantize(path, ring_bytes=ring, granularity=granularity, fp8_dtype=fp8, io=io)
    _assert_exact(model, tensors, granularity, fp8)


@pytest.mark.parametrize("block_size", [(1, 8192), (3, 7), (256, 16), (2, 9000)])
@pytest.mark.parametrize("io", ["mmap", "direct"])
def test_odd_block_sizes(ckpt, block_size, io, no_thread_leak):
    """Granules a slot cannot hold one row of (1 x 8192 F32 > 16 KiB), tall and narrow ones,
    ones wider than the matrix: pieces cut inside them and share their scale."""
    path, tensors = ckpt
    model = stream_quantize(path, ring_bytes=TINY, granularity="block", block_size=block_size, io=io)
    _assert_exact(model, tensors, "block", torch.float8_e4m3fn, block_size)


@pytest.mark.parametrize("granularity", ["tensor", "channel", "block"])
def test_both_hold_and_prepass_happen_for_every_granularity(ckpt, granularity, no_thread_leak):
    """The fixture is built so that at TINY some shared scale granules span few batches (held
    in their slots) and some span more than the ring has slots (pre-passed by the reader)."""
    from mmapload.checkpoint import open_checkpoint
    from mmapload.config import LoadOptions
    from mmapload.decide import policy_for
    from mmapload.plan import plan_batches, scale_groups, split_groups
    path, tensors = ckpt
    o = LoadOptions(ring_bytes=TINY, granularity=granularity)
    c = open_checkpoint(path)
    batches = plan_batches(c.tensors, policy_for(c, o), o.slot_bytes, o.granularity, o.block_size)
    groups = scale_groups(batches)
    prepass, hold = split_groups(batches, o.n_slots, copies=False)
    assert hold == 0 and prepass and set(groups) - prepass, (len(groups), len(prepass))
    # pieces narrower than their matrix exist
    assert any(p.col1 - p.col0 < p.spec.shape[-1] for b in batches for p in b.pieces if p.quantize)
    model = stream_quantize(path, ring_bytes=TINY, granularity=granularity)
    _assert_exact(model, tensors, granularity, torch.float8_e4m3fn)


@pytest.mark.parametrize("granularity", ["tensor", "channel", "block"])
def test_copying_mover_holds_shared_granules_in_its_buffer(ckpt, monkeypatch, granularity, no_thread_leak):
    """The CUDA protocol (pieces copied off the slot, shared granules held in one device
    buffer at per-group offsets), emulated on the CPU."""
    from mmapload.checkpoint import open_checkpoint
    from mmapload.config import LoadOptions
    from mmapload.decide import policy_for
    from mmapload.plan import plan_batches, scale_groups, split_groups
    path, tensors = ckpt
    o = LoadOptions(ring_bytes=TINY, granularity=granularity)
    c = open_checkpoint(path)
    batches = plan_batches(c.tensors, policy_for(c, o), o.slot_bytes, o.granularity, o.block_size)
    prepass, hold = split_groups(batches, o.n_slots, copies=True)
    biggest = max(sum(p.nbytes for p in ps) for ps in scale_groups(batches).values())
    assert not prepass and hold == -(-biggest // 64) * 64
    monkeypatch.setattr(device_mod, "mover_class", lambda dev: _EmulatedDmaMover)
    model = stream_quantize(path, ring_bytes=TINY, granularity=granularity)
    _assert_exact(model, tensors, granularity, torch.float8_e4m3fn)


@pytest.mark.parametrize("shape,granularity", [((1, 4194305), "tensor"), ((1, 4194305), "channel"),
                                               ((1, 4194305), "block"), ((128, 32769), "block")])
def test_rows_wider_than_the_largest_slot_load(tmp_path, shape, granularity, no_thread_leak):
    """Used to fail up front with "raise ring_bytes to at least N" at any ring size (slots are
    capped at 16 MiB)."""
    g = torch.Generator().manual_seed(22)
    w = torch.randn(*shape, generator=g)
    w.view(-1)[-1] = 1000.0
    save_file({"big.weight": w}, tmp_path / "m.safetensors")
    model = stream_quantize(tmp_path / "m.safetensors", granularity=granularity)
    assert model.report.slot_bytes == 16 << 20 and w.nbytes > 16 << 20
    q, s = quantize(w, granularity)
    assert torch.equal(model["big.weight"].scale, s)
    assert torch.equal(model["big.weight"].data.view(torch.uint8), q.view(torch.uint8))


@pytest.fixture(scope="module")
def wide_mib(tmp_path_factory):
    """52 MB of bf16 in 400 KB rows: with a 1 MiB ring (256 KiB slots) the per-tensor scale is
    pre-passed, channel rows are held over 2 batches, block bands (51 MB each) are read as
    strided pieces."""
    w = torch.randn(130, 200000, generator=torch.Generator().manual_seed(23)).bfloat16()
    path = tmp_path_factory.mktemp("widemib") / "m.safetensors"
    save_file({"l0.weight": w}, path)
    return path


@pytest.mark.parametrize("granularity,io", [("tensor", "mmap"), ("channel", "mmap"), ("block", "mmap")])
def test_host_memory_stays_bounded_with_wide_rows(wide_mib, granularity, io):
    """Host contract (tests/test_memory.py) with pieces that cut columns, measured in a fresh
    process: under inspect's projection, and the file-backed RSS far below one block band
    (about 10 MiB of it is torch's code pages, touched for the first time)."""
    import mmapload
    from mmapload.estimate import estimate
    ring = 1 << 20
    root = str(Path(mmapload.__file__).parent.parent)   # this copy of mmapload, not an installed one
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, str(Path(__file__).with_name("memprobe.py")), "mmapload",
                          str(wide_mib), str(ring), granularity, io], capture_output=True, text=True,
                         timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    p = estimate(wide_mib, "cpu", ring_bytes=ring, granularity=granularity, io=io)
    assert r["retained"] == p.retained_bytes
    assert r["peak_rss"] - r["base_rss"] <= p.host_peak, (r, p.host_terms)
    assert r["peak_rss"] - r["base_rss"] - r["retained"] <= ring + (32 << 20), r
    assert r["peak_file"] - r["base_file"] <= ring + (24 << 20), r
