"""The pipeline gives exactly the whole-tensor quantizer's results, chunked or not."""

import pytest
import torch

from mmapload.writer import SafetensorsWriter

from mmapload import QuantizedTensor, stream_quantize
from mmapload.fp8 import quantize, relative_error

from expect import assert_same_as_whole_tensor_quantizer

RING_SMALL = 4 * (68 << 10)  # 68 KiB slots: one block row (128 rows) of each weight fits,
                             # and every weight (each expert) travels in several chunks
RING_BIG = 16 << 20


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    g = torch.Generator().manual_seed(11)
    t = {
        "a.weight": torch.randn(300, 200, generator=g).bfloat16(),          # ragged blocks
        "b.weight": (torch.randn(300, 257, generator=g) * 3).to(torch.float16),
        "experts.weight": torch.randn(4, 600, 64, generator=g).bfloat16(),  # MoE [E, out, in]
        "c.weight": torch.randn(400, 96, generator=g),                      # float32
    }
    t["a.weight"][290, 5] = 77.0          # the per-tensor amax lives in the last chunk
    t["experts.weight"][2, 590, 3] = -50.0
    # small tensors between and after the big ones share slots with their last chunks
    t = {k: t[k] for k in ("a.weight", "c.weight", "b.weight", "experts.weight", "c.weight")}
    t.update({"a.bias": torch.randn(300, generator=g).bfloat16(), "z.norm.weight": torch.ones(96),
              # kept as they are; the embedding is bigger than a small slot (read in pieces)
              "embed_tokens.weight": torch.randn(700, 97, generator=g).bfloat16(),
              "ids": torch.arange(-5, 1000, 3), "mask": torch.arange(33) % 3 == 0})
    order = ["a.weight", "a.bias", "ids", "c.weight", "embed_tokens.weight", "b.weight", "mask",
             "experts.weight", "z.norm.weight"]
    path = tmp_path_factory.mktemp("num") / "m.safetensors"
    with SafetensorsWriter(path, [(n, t[n].dtype, tuple(t[n].shape)) for n in order]) as w:
        for n in order:
            w.write(n, t[n])
    return path, t


def _plan(path, ring, granularity):
    from mmapload.checkpoint import open_checkpoint
    from mmapload.config import LoadOptions
    from mmapload.decide import policy_for
    from mmapload.plan import plan_batches
    o = LoadOptions(ring_bytes=ring, granularity=granularity)
    c = open_checkpoint(path)
    return plan_batches(c.tensors, policy_for(c, o), o.slot_bytes, o.granularity, o.block_size)


@pytest.mark.parametrize("fp8, scale_dtype", [(torch.float8_e4m3fn, "float32"), (torch.float8_e5m2, "float32"),
                                               (torch.float8_e4m3fn, "weight")])
@pytest.mark.parametrize("granularity", ["tensor", "channel", "block"])
def test_chunked_and_unchunked_equal_the_whole_tensor_quantizer(ckpt, granularity, fp8, scale_dtype):
    path, tensors = ckpt
    small = stream_quantize(path, ring_bytes=RING_SMALL, granularity=granularity, fp8_dtype=fp8,
                            scale_dtype=scale_dtype)
    big = stream_quantize(path, ring_bytes=RING_BIG, granularity=granularity, fp8_dtype=fp8,
                          scale_dtype=scale_dtype)
    chunked = {p.spec.name for b in _plan(path, RING_SMALL, granularity) for p in b.pieces
               if p.quantize and not p.whole}
    assert chunked == {n for n in tensors if n.endswith("weight") and "norm" not in n and "embed" not in n}
    for name, w in tensors.items():
        if not name.endswith(".weight") or "norm" in name or "embed" in name:
            assert torch.equal(small[name], w) and torch.equal(big[name], w)
            continue
        q, s = quantize(w, granularity, fp8, scale_dtype=scale_dtype)
        assert s.dtype == (w.dtype if scale_dtype == "weight" else torch.float32)
        for model in (small, big):
            got = model[name]
            assert isinstance(got, QuantizedTensor) and got.data.dtype == fp8 and got.scale.dtype == s.dtype
            assert got.scale.shape == s.shape, (name, got.scale.shape, s.shape)
            assert torch.equal(got.scale, s), name
            assert torch.equal(got.data.view(torch.uint8), q.view(torch.uint8)), name


@pytest.mark.parametrize("fp8, scale_dtype", [(torch.float8_e4m3fn, "float32"), (torch.float8_e5m2, "float32"),
                                               (torch.float8_e4m3fn, "weight")])
def test_per_tensor_prepass_for_matrices_bigger_than_the_ring(ckpt, fp8, scale_dtype):
    """With 32 KiB slots most weights span more batches than the ring has slots: the reader
    must compute their amax from the map first (the hold path cannot keep them)."""
    path, tensors = ckpt
    tiny = 128 << 10            # 32 KiB slots
    spans = {}
    for b in _plan(path, tiny, "tensor"):
        for p in b.pieces:
            if p.quantize and not p.whole:
                spans[(p.spec.name, p.expert)] = spans.get((p.spec.name, p.expert), 0) + 1
    assert max(spans.values()) > 3 and min(spans.values()) <= 3   # both modes in one load
    model = stream_quantize(path, ring_bytes=tiny, fp8_dtype=fp8, scale_dtype=scale_dtype)
    for name in ("a.weight", "b.weight", "c.weight", "experts.weight"):
        q, s = quantize(tensors[name], "tensor", fp8, scale_dtype=scale_dtype)
        assert torch.equal(model[name].scale, s), name
        assert torch.equal(model[name].data.view(torch.uint8), q.view(torch.uint8)), name


def test_expert_scale_shapes(ckpt):
    path, _ = ckpt
    shapes = {g: tuple(stream_quantize(path, granularity=g)["experts.weight"].scale.shape)
              for g in ("tensor", "channel", "block")}
    assert shapes == {"tensor": (4, 1, 1), "channel": (4, 600, 1), "block": (4, 5, 1)}


def test_error_stats_match_a_direct_computation(ckpt):
    path, tensors = ckpt
    for g in ("tensor", "block"):
        model = stream_quantize(path, ring_bytes=RING_SMALL, granularity=g, error_stats=True)
        for name, w in tensors.items():
            if name in ("a.bias", "z.norm.weight", "embed_tokens.weight", "ids", "mask"):
                continue
            qt = model[name]
            want = relative_error(w, qt.data, qt.scale, g)
            assert qt.rel_error == pytest.approx(want, rel=1e-4), name
            assert 0 < qt.rel_error < 0.1
    assert stream_quantize(path)["a.weight"].rel_error is None   # off by default


@pytest.mark.parametrize("io", ["pread", "direct", "view"])
@pytest.mark.parametrize("granularity", ["tensor", "channel", "block"])
def test_every_io_mode_gives_identical_results(ckpt, io, granularity):
    path, tensors = ckpt
    ref = stream_quantize(path, ring_bytes=RING_SMALL, granularity=granularity, io="mmap")
    for ring in (RING_SMALL, 128 << 10 if granularity != "block" else RING_SMALL):
        got = stream_quantize(path, ring_bytes=ring, granularity=granularity, io=io)
        for name, t in ref.items():
            g = got[name]
            if isinstance(t, QuantizedTensor):
                assert torch.equal(g.scale, t.scale), name
                assert torch.equal(g.data.view(torch.uint8), t.data.view(torch.uint8)), name
            else:
                assert torch.equal(g, t), name


@pytest.fixture(scope="module")
def mib_ckpt(tmp_path_factory):
    """Tensors of a few MiB, so that with 4 MiB slots a run splits over several copy threads."""
    from safetensors.torch import save_file
    g = torch.Generator().manual_seed(12)
    t = {"model.embed_tokens.weight": torch.randn(3000, 700, generator=g).bfloat16(),  # 4 MiB, kept
         "l0.weight": torch.randn(2048, 1030, generator=g).bfloat16(),
         "l1.weight": torch.randn(1500, 1000, generator=g).bfloat16(),
         "l1.bias": torch.randn(1500, generator=g).bfloat16(),
         "l2.weight": torch.randn(3, 512, 768, generator=g).bfloat16()}
    path = tmp_path_factory.mktemp("mib") / "m.safetensors"
    save_file(t, path)
    return path, t


@pytest.mark.parametrize("io", ["mmap", "pread", "direct", "view"])
@pytest.mark.parametrize("granularity", ["tensor", "block"])
def test_several_read_threads_give_identical_results(mib_ckpt, io, granularity, no_thread_leak):
    path, tensors = mib_ckpt
    model = stream_quantize(path, ring_bytes=16 << 20, granularity=granularity, io=io, read_threads=3)
    assert model.report.read_threads == (1 if io == "direct" else 3)   # direct reads with one, whatever asked
    assert_same_as_whole_tensor_quantizer(model, tensors, granularity)
