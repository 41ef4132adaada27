"""``results(pipe, out_for=...)``: a tensor kept as it is is read straight into the caller's tensor (an
engine's parameter), so an engine that copies what it is handed does not hold it twice."""

import pytest
import torch
from safetensors.torch import save_file

from mmapload import LoadConfig, QuantizedTensor, iter_quantized
from mmapload.stream import prepare, results

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _ckpt(tmp_path):
    g = torch.Generator().manual_seed(0)
    t = {"model.embed_tokens.weight": torch.randn(300, 64, generator=g).bfloat16(),   # kept, several slots
         "model.layers.0.mlp.up_proj.weight": torch.randn(128, 64, generator=g).bfloat16(),
         "model.norm.weight": torch.randn(64, generator=g),
         "lm_head.weight": torch.randn(300, 64, generator=g).bfloat16()}
    save_file(t, tmp_path / "model.safetensors")
    return tmp_path / "model.safetensors", t


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("io", ["mmap", "pread", "direct", "view"])
def test_kept_tensors_land_in_the_callers_tensors(tmp_path, io, device):
    path, src = _ckpt(tmp_path)
    mine = {"model.embed_tokens.weight": torch.full((300, 64), 7.0, dtype=torch.bfloat16, device=device),
            "model.norm.weight": torch.zeros(64, device=device),
            "lm_head.weight": torch.zeros(300, 64, dtype=torch.float16, device=device)}   # wrong dtype: not used
    asked = []

    def out_for(name, shape, dtype):
        asked.append((name, shape, dtype))
        return mine.get(name)

    cfg = LoadConfig(ring_bytes=64 << 10, io=io, granularity="channel")   # 16 KiB slots: embed spans several
    got = dict(results(prepare(path, device, cfg), out_for=out_for))
    assert got["model.embed_tokens.weight"] is mine["model.embed_tokens.weight"]
    assert got["model.norm.weight"] is mine["model.norm.weight"]
    assert got["lm_head.weight"] is not mine["lm_head.weight"]   # the caller's had the wrong dtype
    for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        assert torch.equal(got[name].cpu(), src[name]), name
    assert isinstance(got["model.layers.0.mlp.up_proj.weight"], QuantizedTensor)
    assert ("model.layers.0.mlp.up_proj.weight", (128, 64), torch.bfloat16) not in asked   # quantized: never asked
    assert ("model.embed_tokens.weight", (300, 64), torch.bfloat16) in asked


def test_without_out_for_the_same_bytes_come_out(tmp_path):
    path, src = _ckpt(tmp_path)
    plain = dict(iter_quantized(path, granularity="channel"))
    into = dict(results(prepare(path, "cpu", LoadConfig(granularity="channel")),
                        out_for=lambda name, shape, dtype: torch.empty(shape, dtype=dtype)))
    assert plain.keys() == into.keys()
    for name, t in plain.items():
        if isinstance(t, QuantizedTensor):
            assert torch.equal(t.data.view(torch.uint8), into[name].data.view(torch.uint8))
        else:
            assert torch.equal(t, into[name]) and torch.equal(t, src[name])


@pytest.mark.parametrize("bad", [torch.empty(64, 300, dtype=torch.bfloat16),          # shape
                                 torch.empty(64, 600, dtype=torch.bfloat16)[:, :300].T,  # not contiguous
                                 "not a tensor"])
def test_a_tensor_that_cannot_take_it_is_ignored(tmp_path, bad):
    path, src = _ckpt(tmp_path)
    got = dict(results(prepare(path, "cpu", LoadConfig()), out_for=lambda *a: bad))
    assert got["model.embed_tokens.weight"] is not bad
    assert torch.equal(got["model.embed_tokens.weight"], src["model.embed_tokens.weight"])
