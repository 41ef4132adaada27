"""FP8 checkpoints read back: weights paired with their scales, nothing re-quantized."""

import pytest
import torch
from safetensors.torch import save_file

import mmapload
from mmapload import QuantizedTensor, convert, iter_quantized, stream_quantize
from mmapload.synth import make_llama_checkpoint


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    return make_llama_checkpoint(tmp_path_factory.mktemp("src"), 3 << 20, shards=2)


@pytest.mark.parametrize("granularity", ["tensor", "channel", "block"])
def test_convert_then_stream_quantize_round_trips_bit_for_bit(src, tmp_path, granularity, no_thread_leak):
    direct = stream_quantize(src, granularity=granularity, ring_bytes=1 << 20)
    out = convert(src, tmp_path / "fp8", granularity=granularity, ring_bytes=1 << 20)
    back = stream_quantize(out, granularity=granularity, ring_bytes=1 << 20)   # what convert kept: as direct
    assert set(back) == set(direct)
    n = 0
    for name, t in direct.items():
        b = back[name]
        if isinstance(t, QuantizedTensor):
            n += 1
            assert isinstance(b, QuantizedTensor) and b.granularity == t.granularity, name
            assert torch.equal(b.data.view(torch.uint8), t.data.view(torch.uint8)), name
            assert torch.equal(b.scale, t.scale) and b.scale.shape == t.scale.shape, name
            assert torch.equal(b.dequantize(torch.float32), t.dequantize(torch.float32)), name
        else:
            assert torch.equal(b, t), name
    assert n > 5


def test_scale_inv_block_layout_and_scale_in_another_shard(tmp_path):
    from mmapload.fp8 import quantize
    w = torch.randn(300, 260)
    q, s = quantize(w, "block")
    save_file({"a.weight": q}, tmp_path / "model-1.safetensors")
    save_file({"a.weight_scale_inv": s, "b": torch.arange(3)}, tmp_path / "model-2.safetensors")
    got = stream_quantize(tmp_path)
    assert set(got) == {"a.weight", "b"}
    qt = got["a.weight"]
    assert qt.granularity.value == "block" and qt.block_size == (128, 128)
    assert torch.equal(qt.data.view(torch.uint8), q.view(torch.uint8)) and torch.equal(qt.scale, s)


def test_per_tensor_scale_of_shape_one_is_accepted(tmp_path):
    q = torch.randn(16, 16).to(torch.float8_e4m3fn)
    save_file({"l.weight": q, "l.weight_scale": torch.tensor([0.5])}, tmp_path / "m.safetensors")
    qt = stream_quantize(tmp_path / "m.safetensors")["l.weight"]
    assert qt.granularity.value == "tensor" and qt.scale.shape == ()
    assert torch.equal(qt.dequantize(torch.float32), q.float() * 0.5)


def test_scale_of_impossible_shape_is_a_header_error(tmp_path):
    q = torch.randn(16, 16).to(torch.float8_e4m3fn)
    save_file({"l.weight": q, "l.weight_scale": torch.ones(3, 5)}, tmp_path / "m.safetensors")
    with pytest.raises(mmapload.HeaderError, match=r"l\.weight_scale.*\[3, 5\]"):
        stream_quantize(tmp_path / "m.safetensors")


def test_flat_iterator_yields_convert_naming(src, tmp_path, no_thread_leak):
    from safetensors.torch import load_file
    items = list(iter_quantized(src, flat=True, granularity="channel", ring_bytes=1 << 20))
    names = [n for n, _ in items]
    assert all(isinstance(t, torch.Tensor) for _, t in items)
    out = convert(src, tmp_path / "fp8", granularity="channel", ring_bytes=1 << 20)
    written = {}
    for f in sorted(out.glob("*.safetensors")):
        written.update(load_file(f))
    assert set(names) == set(written)
    i = names.index("model.layers.0.mlp.up_proj.weight")
    assert names[i + 1] == "model.layers.0.mlp.up_proj.weight_scale"
    for n, t in items:
        assert torch.equal(t.reshape(-1).view(torch.uint8), written[n].reshape(-1).view(torch.uint8)), n
    with pytest.raises(mmapload.OptionsError):
        iter_quantized(src, flat="yes")


def _fp8_source(root, gran="block"):
    """A partly FP8 checkpoint (DeepSeek-like): FP8 weights with `_scale_inv` (one scale in
    another shard, one stored before its weight), bf16 weights still to quantize, a norm."""
    from mmapload.fp8 import quantize
    g = torch.Generator().manual_seed(8)
    w = {n: torch.randn(300, 256, generator=g) for n in ("a.weight", "b.weight", "c.weight")}
    qa, sa = quantize(w["a.weight"], gran)
    qb, sb = quantize(w["b.weight"], gran)
    suffix = "_scale_inv" if gran == "block" else "_scale"
    root.mkdir()
    save_file({"a.weight": qa, "a.weight" + suffix: sa, "b.weight": qb, "n.norm.weight": torch.ones(256)},
              root / "model-00001-of-00002.safetensors")
    save_file({"b.weight" + suffix: sb, "c.weight": w["c.weight"].bfloat16()},
              root / "model-00002-of-00002.safetensors")
    (root / "config.json").write_text('{"model_type": "llama"}')
    return {"a.weight": (qa, sa), "b.weight": (qb, sb)}, w["c.weight"].bfloat16()


@pytest.mark.parametrize("fmt", ["compressed-tensors", "fp8"])
def test_fp8_source_is_translated_to_the_format_not_requantized(tmp_path, fmt, no_thread_leak):
    import json
    from safetensors import safe_open
    fp8, c = _fp8_source(tmp_path / "src")
    out = convert(tmp_path / "src", tmp_path / "out", format=fmt, granularity="block", ring_bytes=1 << 20)
    suffix = "_scale" if fmt == "compressed-tensors" else "_scale_inv"
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert index["b.weight" + suffix] == "model-00002-of-00002.safetensors"   # where the pair completes
    assert not any(k.endswith("_scale_inv" if suffix == "_scale" else "weight_scale") for k in index)
    for name, (q, s) in fp8.items():
        with safe_open(str(out / index[name + suffix]), "pt") as f:
            assert torch.equal(f.get_tensor(name + suffix), s), name
    back = stream_quantize(out)
    for name, (q, s) in fp8.items():
        qt = back[name]
        assert qt.granularity.value == "block", name
        assert torch.equal(qt.data.view(torch.uint8), q.view(torch.uint8)) and torch.equal(qt.scale, s), name
    from mmapload.fp8 import quantize
    qc, sc = quantize(c, "block")
    assert torch.equal(back["c.weight"].data.view(torch.uint8), qc.view(torch.uint8))
    assert torch.equal(back["n.norm.weight"], torch.ones(256))


def test_fp8_source_of_another_granularity_is_an_options_error_naming_the_fix(tmp_path, no_thread_leak):
    _fp8_source(tmp_path / "src")
    with pytest.raises(mmapload.OptionsError, match=r"a\.weight.*block \(128x128\).*granularity='block', "
                                                    r"block_size=\(128, 128\)"):
        convert(tmp_path / "src", tmp_path / "out")
    assert not (tmp_path / "out").exists() and list(tmp_path.iterdir()) == [tmp_path / "src"]


def test_per_tensor_fp8_source_gets_each_formats_scale_shape(tmp_path, no_thread_leak):
    from safetensors import safe_open
    _fp8_source(tmp_path / "src", gran="tensor")
    for fmt, shape in (("compressed-tensors", (1,)), ("fp8", ())):
        out = convert(tmp_path / "src", tmp_path / fmt, format=fmt)
        with safe_open(str(out / "model-00002-of-00002.safetensors"), "pt") as f:
            assert tuple(f.get_slice("b.weight_scale").get_shape()) == shape, fmt
        assert stream_quantize(out)["a.weight"].granularity.value == "tensor"
