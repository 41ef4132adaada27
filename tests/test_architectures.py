"""Real architectures (tiny, random, built with transformers on the fly): exactly the Linear weights
and MoE experts become FP8; convert's output loads in transformers + compressed-tensors as the same
model; load_into runs every one of them."""

import re
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="transformers not installed")
pytest.importorskip("compressed_tensors", reason="compressed-tensors not installed")

import archs  # noqa: E402 - after the skips
from mmapload import MmapLoadWarning, QuantizedTensor, convert, iter_quantized  # noqa: E402
from mmapload.checkpoint import open_checkpoint  # noqa: E402
from mmapload.nn import FP8Linear, load_into  # noqa: E402
from mmapload.config import LoadOptions  # noqa: E402
from mmapload.decide import policy_for  # noqa: E402
from mmapload.estimate import estimate  # noqa: E402

BLOCK = (32, 32)   # the tiny models' sides (64, 128) are whole blocks; Mamba's x_proj / dt_proj are not
ATTN = r"model\.layers\.\d\.self_attn\.[qkvo]_proj\.weight"
# what stream_quantize quantizes: Linear weights and MoE experts; never embeddings, lm_head, norms,
# convolutions, GPT-2 Conv1D, routers, T5's _keep_in_fp32_modules ("wo")
QUANTIZED = {
    "llama": rf"{ATTN}|model\.layers\.\d\.mlp\.(gate|up|down)_proj\.weight",
    "gpt2": r"(?!)",
    "t5": r"(en|de)coder\.block\.\d\.layer\.\d\.((SelfAttention|EncDecAttention)\.[qkvo]|DenseReluDense\.wi)\.weight",
    "mamba": r"backbone\.layers\.\d\.mixer\.(in|x|dt|out)_proj\.weight",
    "mixtral": rf"{ATTN}|model\.layers\.\d\.block_sparse_moe\.experts\.\d\.w[123]\.weight",
    "qwen3_moe": rf"{ATTN}|model\.layers\.\d\.mlp\.experts\.\d\.(gate|up|down)_proj\.weight",
    "gpt_oss": rf"{ATTN}|model\.layers\.\d\.mlp\.experts\.(gate_up|down)_proj",
}
KEPT = {   # a few that must stay, with the rule that keeps them
    "gpt2": {"transformer.wte.weight": "embedding", "transformer.wpe.weight": "embedding",
             "transformer.h.0.attn.c_attn.weight": "Conv1D"},
    "t5": {"shared.weight": "embedding", "encoder.block.0.layer.1.DenseReluDense.wo.weight": "_keep_in_fp32_modules",
           "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight": "embedding"},
    "mamba": {"backbone.layers.0.mixer.conv1d.weight": "convolution", "backbone.embeddings.weight": "embedding"},
    "mixtral": {"model.layers.0.block_sparse_moe.gate.weight": "router", "lm_head.weight": "lm_head"},
    "qwen3_moe": {"model.layers.0.mlp.gate.weight": "router", "model.embed_tokens.weight": "embedding"},
    "gpt_oss": {"model.layers.0.mlp.router.weight": "router", "model.layers.0.mlp.experts.gate_up_proj_bias": "not a Linear"},
}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """kind -> (folder, bf16 reference logits), built on first use."""
    cache = {}

    def get(kind):
        if kind not in cache:
            folder = archs.build(kind, tmp_path_factory.mktemp(kind))
            ref = archs.model_class(kind).from_pretrained(folder, dtype=torch.bfloat16)
            cache[kind] = folder, archs.logits(ref)
        return cache[kind]
    return get


def _want(kind, folder):
    return {s.name for s in open_checkpoint(folder).tensors if re.fullmatch(QUANTIZED[kind], s.name)}


@pytest.mark.parametrize("kind", archs.KINDS)
def test_exactly_linear_weights_and_experts_are_quantized(kind, built, no_thread_leak):
    folder, _ = built(kind)
    got = {n for n, t in iter_quantized(folder) if isinstance(t, QuantizedTensor)}
    assert got == _want(kind, folder) and (got or kind == "gpt2")
    c = open_checkpoint(folder)
    policy = policy_for(c, LoadOptions())
    assert policy.source == archs.model_class(kind).__name__   # judged by the model, not the names
    for name, why in KEPT.get(kind, {}).items():                # each named keep, for its reason
        d = policy.decide(c[name])
        assert not d.quantize and why in d.rule, (name, d.rule)


@pytest.mark.parametrize("kind", archs.KINDS)
def test_the_name_rule_alone_gets_the_families_right(kind, built):
    folder, _ = built(kind)
    got = {n for n, t in iter_quantized(folder, policy="names") if isinstance(t, QuantizedTensor)}
    want = _want(kind, folder)
    if kind == "t5":   # without the model the rule cannot know T5's _keep_in_fp32_modules
        want |= {n for n in (s.name for s in open_checkpoint(folder).tensors) if n.endswith("DenseReluDense.wo.weight")}
    assert got == want


def test_inspect_names_the_rule_that_kept_each_tensor(built):
    folder, _ = built("mixtral")
    text = estimate(folder, "cpu").format()
    assert "decided by MixtralForCausalLM" in text
    assert re.search(r"2 x +name rule: MoE router: .*block_sparse_moe\.gate\.weight", text)
    assert re.search(r"1 x +MixtralForCausalLM: embedding \(Embedding\)", text)
    folder, _ = built("gpt2")
    assert "GPT2LMHeadModel: GPT-2 Conv1D, stored [in, out] (Conv1D)" in estimate(folder, "cpu").format()


@pytest.mark.parametrize("granularity", ["tensor", "channel", "block"])
@pytest.mark.parametrize("kind", archs.KINDS)
def test_convert_loads_in_transformers_as_the_same_model(kind, granularity, built, tmp_path):
    folder, ref = built(kind)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dst = convert(folder, tmp_path / "out", granularity=granularity, block_size=BLOCK)
    fp8 = {s.name for s in open_checkpoint(dst).tensors if s.dtype == "F8_E4M3"}
    want = {n for n in _want(kind, folder) if ".experts.gate_up_proj" not in n and ".experts.down_proj" not in n}
    if granularity == "block" and kind == "mamba":   # dt_proj [128, 4]: 4 inputs are no whole 32-wide block
        want = {n for n in want if "dt_proj" not in n}
    assert fp8 == want
    said = [str(w.message) for w in caught if issubclass(w.category, MmapLoadWarning)]
    moe_block = granularity == "block" and kind in ("mixtral", "qwen3_moe")
    # GPT-2: its Conv1D layers are kept (vLLM builds Linear layers for them), so nothing is FP8
    assert (kind == "gpt2") == any("no tensor is quantized" in m for m in said) == (not want)
    said = [m for m in said if "no tensor is quantized" not in m]
    assert bool(said) == (kind == "gpt_oss" or (kind, granularity) == ("mamba", "block") or moe_block)
    assert moe_block == any("transformers 5 cannot" in m for m in said)
    if granularity == "block" and kind in ("mixtral", "qwen3_moe"):
        # transformers 5.24 fuses per-expert weights on load and dequantizes them with `q * scale`,
        # which cannot broadcast a block grid (vLLM's FusedMoE reads block experts): check the files
        # with compressed-tensors' own decompressor, and the model through load_into of the output
        _decompressed_like_ours(dst)
        with torch.device("meta"):
            model = archs.model_class(kind)(archs.config(kind))
        got = archs.logits(load_into(model, dst, granularity=granularity, block_size=BLOCK))
    else:
        got = archs.logits(archs.model_class(kind).from_pretrained(dst, dtype=torch.bfloat16))
    cos = archs.cosine(ref, got)
    print(f"\n{kind} {granularity}: convert -> transformers logits cosine {cos:.5f}")
    assert cos >= 0.99


def _decompressed_like_ours(dst):
    """compressed-tensors' decompressor gives every FP8 weight of ``dst`` as we dequantize it."""
    import json
    from compressed_tensors.compressors import FloatQuantizationCompressor
    from compressed_tensors.quantization import QuantizationConfig
    from safetensors.torch import load_file
    qc = QuantizationConfig.model_validate(json.loads((dst / "config.json").read_text())["quantization_config"])
    scheme, sd = qc.config_groups["group_0"], load_file(dst / "model.safetensors")
    names = [n for n, t in sd.items() if t.dtype == torch.float8_e4m3fn]
    for n in names:
        out = FloatQuantizationCompressor.decompress({"weight": sd[n], "weight_scale": sd[n + "_scale"]}, scheme)
        mine = QuantizedTensor(sd[n], sd[n + "_scale"], torch.float32, "block", BLOCK).dequantize(torch.float32)
        assert torch.equal(out["weight"].float(), mine), n
    assert len(names) > 10


@pytest.mark.parametrize("granularity", ["tensor", "channel", "block"])
@pytest.mark.parametrize("kind", archs.KINDS)
def test_load_into_runs_forward(kind, granularity, built, no_thread_leak):
    folder, ref = built(kind)
    with torch.device("meta"):
        model = archs.model_class(kind)(archs.config(kind))
    load_into(model, folder, granularity=granularity, block_size=BLOCK)
    fp8 = [n for n, m in model.named_modules() if isinstance(m, FP8Linear)]
    assert bool(fp8) == (kind != "gpt2")
    if kind == "t5":   # _keep_in_fp32_modules stay nn.Linear; the rest of the attention is FP8
        assert not any(n.endswith(".wo") for n in fp8) and any(n.endswith("SelfAttention.q") for n in fp8)
    cos = archs.cosine(ref, archs.logits(model))
    print(f"\n{kind} {granularity}: load_into logits cosine {cos:.5f}")
    assert cos >= 0.99


def test_the_model_is_built_in_a_child_process_unless_transformers_is_loaded(built):
    """The parent never imports transformers for the policy (~150 MiB of RSS it would keep for the
    whole load); the child's description decides exactly as the in-process model does."""
    import json
    import subprocess
    import sys
    folder, _ = built("t5")
    code = ("import json, sys; from mmapload.checkpoint import open_checkpoint; from mmapload.config import "
            "LoadOptions; from mmapload.decide import policy_for; c = open_checkpoint(sys.argv[1]); "
            "p = policy_for(c, LoadOptions()); print(json.dumps({'loaded': 'transformers' in sys.modules, "
            "'source': p.source, 'rules': {s.name: p.decide(s).rule for s in c.tensors}}))")
    out = json.loads(subprocess.run([sys.executable, "-c", code, str(folder)], capture_output=True, text=True,
                                    check=True).stdout)
    here = policy_for(open_checkpoint(folder), LoadOptions())   # transformers is imported in this process
    assert out["loaded"] is False and out["source"] == here.source == "T5ForConditionalGeneration"
    assert out["rules"] == {s.name: here.decide(s).rule for s in open_checkpoint(folder).tensors}


def test_convert_keeps_block_layers_whose_input_is_no_whole_blocks(built, tmp_path):
    """Mamba's dt_proj has 4 input features: 32-wide activation groups cannot tile them, so
    convert keeps it (and says so, and ignores it); x_proj ([20, 128]: a ragged block row) is FP8."""
    folder, _ = built("mamba")
    with pytest.warns(MmapLoadWarning, match=r"dt_proj.*4 input features are not whole 32-wide blocks"):
        dst = convert(folder, tmp_path / "out", granularity="block", block_size=BLOCK)
    import json
    ignore = json.loads((dst / "config.json").read_text())["quantization_config"]["ignore"]
    assert "backbone.layers.0.mixer.dt_proj" in ignore and "backbone.layers.0.mixer.x_proj" not in ignore
    dtypes = {s.name: s.dtype for s in open_checkpoint(dst).tensors}
    assert dtypes["backbone.layers.0.mixer.x_proj.weight"] == "F8_E4M3"
    assert dtypes["backbone.layers.0.mixer.dt_proj.weight"] == "BF16"


@pytest.mark.parametrize("policy", ["auto", "names"])
def test_convert_ignores_gpt2_conv1d_weights_that_engines_build_as_linear(built, tmp_path, policy):
    """GPT-2's Conv1D weights stay bf16 ([in, out]), but vLLM builds Column/RowParallelLinear layers for
    c_attn / c_proj / c_fc: unless ``ignore`` lists them it makes FP8 layers, copies the bf16 bytes in
    and never gets a scale (a newcomer's vLLM run generated NaN)."""
    import json
    folder, _ = built("gpt2")
    dst = convert(folder, tmp_path / "out", granularity="channel", policy=policy)
    ignore = json.loads((dst / "config.json").read_text())["quantization_config"]["ignore"]
    conv1d = {s.name.removesuffix(".weight") for s in open_checkpoint(folder).tensors
              if re.search(r"\.(c_attn|c_proj|c_fc)\.weight$", s.name)}
    assert len(conv1d) == 8 and conv1d <= set(ignore), sorted(conv1d - set(ignore))
    assert {s.name: s.dtype for s in open_checkpoint(dst).tensors}["transformer.h.0.attn.c_attn.weight"] == "BF16"
