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
    back = stream_quantize(out, ring_bytes=1 << 20)
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
