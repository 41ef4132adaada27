"""The quantization policy's options, and what convert refuses or must be told: sources quantized
by another method, FP8 weights without a scale, FP8 sources with their own block size."""

import json

import pytest
import torch
from safetensors.torch import save_file

import mmapload
from mmapload import QuantizedSourceError, QuantizedTensor, convert, stream_quantize
from mmapload.checkpoint import open_checkpoint
from mmapload.cli import main
from mmapload.converter import check_written
from mmapload.fp8 import quantize
from mmapload.config import LoadOptions
from mmapload.decide import policy_for


def _llama_like(folder, config=None, extra=None):
    torch.manual_seed(0)
    sd = {"model.embed_tokens.weight": torch.randn(64, 32), "lm_head.weight": torch.randn(64, 32),
          "model.layers.0.self_attn.q_proj.weight": torch.randn(32, 32),
          "model.layers.0.mlp.down_proj.weight": torch.randn(32, 64),
          "model.layers.0.input_layernorm.weight": torch.ones(32)}
    sd = {k: v.to(torch.bfloat16) for k, v in sd.items()} | (extra or {})
    folder.mkdir(parents=True, exist_ok=True)
    save_file(sd, folder / "model.safetensors")
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config))
    return folder


def _quantized(path, **opts):
    return {n for n, t in stream_quantize(path, **opts).items() if isinstance(t, QuantizedTensor)}


Q, DOWN = "model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.down_proj.weight"


@pytest.mark.parametrize("opts,want", [
    ({}, {Q, DOWN}),
    ({"targets": ["re:.*q_proj"]}, {Q}),
    ({"targets": "Linear"}, {Q, DOWN, "lm_head.weight"}),          # class name: every Linear-like weight
    ({"ignore": ["model.layers.0.mlp.down_proj"]}, {Q}),            # a module name, exactly
    ({"ignore": ["re:model\\.layers\\.\\d+\\.mlp"]}, {Q}),           # re: matched at the start
    ({"ignore": ["down_proj"]}, {Q, DOWN}),                         # no substring matching (compressed-tensors)
    ({"ignore": ["Linear"]}, set()),
    ({"skip": ["down_proj"]}, {Q}),                                 # skip: tensor-name substring / glob
    ({"targets": ["re:.*embed_tokens"]}, {"model.embed_tokens.weight"}),   # targets override the rule
])
def test_targets_ignore_and_skip(tmp_path, opts, want):
    assert _quantized(_llama_like(tmp_path / "m"), **opts) == want


@pytest.mark.parametrize("opts,match", [
    ({"ignore": ["re:("]}, "not a valid regular expression"),
    ({"targets": [""]}, "non-empty name patterns"),
    ({"policy": "guess"}, "policy must be one of"),
])
def test_bad_policy_options(tmp_path, opts, match):
    with pytest.raises(mmapload.OptionsError, match=match):
        stream_quantize(_llama_like(tmp_path / "m"), **opts)


def test_policy_model_needs_a_model(tmp_path):
    with pytest.raises(mmapload.OptionsError, match="no config.json.*policy='auto'"):
        stream_quantize(_llama_like(tmp_path / "m"), policy="model")


@pytest.mark.parametrize("method,extra", [
    ({"quant_method": "gptq", "bits": 4}, {}),
    ({"quant_method": "awq"}, {}),
    ({"quant_method": "compressed-tensors", "format": "pack-quantized"}, {}),
    (None, {"model.layers.1.mlp.up_proj.qweight": torch.zeros(4, 8, dtype=torch.int32)}),
    (None, {"model.layers.1.mlp.experts.gate_up_proj_blocks": torch.zeros(2, 4, 8, dtype=torch.uint8)}),
])
def test_a_source_quantized_by_another_method_is_refused(tmp_path, method, extra, capsys):
    cfg = {"model_type": "llama"} | ({"quantization_config": method} if method else {})
    src = _llama_like(tmp_path / "m", cfg, extra)
    name = (method or {}).get("quant_method") or ("MXFP4" if "blocks" in str(extra) else "GPTQ/AWQ")
    for call in (lambda: convert(src, tmp_path / "out"), lambda: stream_quantize(src)):
        with pytest.raises(QuantizedSourceError, match=name):
            call()
    assert not (tmp_path / "out").exists()
    assert main(["convert", str(src), str(tmp_path / "out")]) == 2
    assert name in capsys.readouterr().err


def _fp8_source(folder, w_shape, block, config_block, scale_shape=None):
    """One FP8 block-quantized weight (``block``), its scale, and a config.json naming
    ``config_block`` as weight_block_size (None: no quantization_config)."""
    torch.manual_seed(1)
    w = torch.randn(w_shape)
    q, s = quantize(w, "block", block_size=block)
    s = s if scale_shape is None else s.reshape(scale_shape)
    cfg = {"model_type": "llama"}
    if config_block:
        cfg["quantization_config"] = {"quant_method": "fp8", "weight_block_size": list(config_block)}
    folder.mkdir(parents=True)
    save_file({"layer.weight": q, "layer.weight_scale_inv": s.contiguous()}, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder, q, s


@pytest.mark.parametrize("shape", [(100, 130), (50, 60)])   # ragged 64x64 blocks; one block ([1, 1] scale)
def test_fp8_source_is_read_with_its_own_block_size(tmp_path, shape):
    src, q, s = _fp8_source(tmp_path / "m", shape, (64, 64), (64, 64))
    got = stream_quantize(src)["layer.weight"]
    assert got.granularity is mmapload.Granularity.BLOCK and got.block_size == (64, 64)
    assert torch.equal(got.data.view(torch.uint8), q.view(torch.uint8)) and torch.equal(got.scale, s)
    want = QuantizedTensor(q, s, torch.float32, "block", (64, 64)).dequantize(torch.float32)
    assert torch.equal(got.dequantize(torch.float32), want)
    dst = convert(src, tmp_path / "out", granularity="block", block_size=(64, 64))
    qc = json.loads((dst / "config.json").read_text())["quantization_config"]
    assert qc["config_groups"]["group_0"]["weights"]["block_structure"] == [64, 64]
    back = stream_quantize(dst)["layer.weight"]
    assert torch.equal(back.dequantize(torch.float32), want)


def test_fp8_source_without_a_declared_block_uses_the_callers(tmp_path):
    src, q, s = _fp8_source(tmp_path / "m", (100, 130), (64, 64), None)
    with pytest.raises(mmapload.HeaderError, match=r"block_size \(128, 128\).*pass block_size="):
        stream_quantize(src)                           # the default 128x128 gives a [1, 2] grid, not [2, 3]
    got = stream_quantize(src, block_size=(64, 64))["layer.weight"]
    assert got.block_size == (64, 64) and torch.equal(got.scale, s)


def test_fp8_source_whose_config_and_scales_disagree(tmp_path):
    src, _, _ = _fp8_source(tmp_path / "m", (100, 130), (128, 128), (64, 64))
    with pytest.raises(mmapload.HeaderError, match=r"64x64 blocks, which give \[2, 3\].*disagree"):
        stream_quantize(src)


def test_fp8_weights_without_a_scale_need_one_said(tmp_path):
    extra = {"model.layers.0.self_attn.k_proj.weight": torch.randn(16, 32).to(torch.float8_e4m3fn)}
    src = _llama_like(tmp_path / "m", {"model_type": "llama"}, extra)
    with pytest.raises(mmapload.OptionsError, match="k_proj.weight.*without a scale.*fp8_weight_scale"):
        convert(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    dst = convert(src, tmp_path / "out", fp8_weight_scale=0.5, granularity="channel")
    got = stream_quantize(dst, granularity="channel")["model.layers.0.self_attn.k_proj.weight"]
    assert torch.equal(got.scale, torch.full((16, 1), 0.5))
    assert torch.equal(got.data.view(torch.uint8), extra["model.layers.0.self_attn.k_proj.weight"].view(torch.uint8))


def test_check_written_catches_a_config_that_misdescribes_the_files(tmp_path):
    src = _llama_like(tmp_path / "m", {"model_type": "llama"})
    dst = convert(src, tmp_path / "out", policy="names")
    cfg = json.loads((dst / "config.json").read_text())["quantization_config"]
    opts = LoadOptions()
    policy = policy_for(open_checkpoint(src), opts)
    assert cfg["ignore"] == ["lm_head"]
    check_written(dst, "compressed-tensors", opts, cfg, policy)          # as written: fine
    with pytest.raises(mmapload.CheckpointError, match="lm_head.*not FP8: add 'lm_head' to ignore"):
        check_written(dst, "compressed-tensors", opts, cfg | {"ignore": []}, policy)
    with pytest.raises(mmapload.CheckpointError, match="q_proj.weight.*does not target it"):
        check_written(dst, "compressed-tensors", opts, cfg | {"ignore": ["lm_head", "re:.*q_proj"]}, policy)


def _named(folder, names_shapes, config=None):
    torch.manual_seed(0)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({n: torch.randn(s).to(torch.bfloat16) for n, s in names_shapes.items()}, folder / "model.safetensors")
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_name_rule_keeps_routers_inside_a_router_and_heads_under_other_names(tmp_path):
    src = _named(tmp_path / "m", {"model.layers.0.mlp.router.layer.weight": (4, 32),      # JetMoe / DBRX
                                  "model.layers.0.block_sparse_moe.router.layer.weight": (4, 32),   # Granite
                                  "output.weight": (64, 32), "gpt_neox.embed_out.weight": (64, 32),
                                  "transformer.output_layer.weight": (64, 32),
                                  "model.layers.0.mlp.up_proj.weight": (64, 32)})
    assert _quantized(src) == {"model.layers.0.mlp.up_proj.weight"}
    p = policy_for(open_checkpoint(src), LoadOptions())
    assert p.decide(open_checkpoint(src)["output.weight"]).rule == "name rule: lm_head (output embeddings)"
    assert "router" in p.decide(open_checkpoint(src)["model.layers.0.mlp.router.layer.weight"]).rule


def test_a_config_of_another_model_is_said_and_not_trusted(tmp_path):
    pytest.importorskip("transformers")
    llama = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 32,
             "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2, "vocab_size": 64}
    gpt2 = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "n_embd": 32, "n_layer": 1,
            "n_head": 2, "vocab_size": 64}
    for cfg, why in ((gpt2, r"has 1 of its \d+ parameters in the checkpoint"),
                     (llama | {"hidden_size": 64, "num_attention_heads": 4}, "expects .* of shape")):
        src = _llama_like(tmp_path / cfg["model_type"] / str(cfg["hidden_size"] if "hidden_size" in cfg else 0), cfg)
        with pytest.warns(mmapload.MmapLoadWarning, match=why):
            p = policy_for(open_checkpoint(src), LoadOptions())
        assert p.source.startswith("name rule (config.json's")
        with pytest.raises(mmapload.OptionsError, match="policy='model'.*" + why):
            policy_for(open_checkpoint(src), LoadOptions(policy="model"))
    import transformers
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**llama)).save_pretrained(tmp_path / "right")
    assert policy_for(open_checkpoint(tmp_path / "right"), LoadOptions(policy="model")).source == "LlamaForCausalLM"


def test_patterns_that_match_nothing_are_said(tmp_path):
    src = _llama_like(tmp_path / "m")
    with pytest.warns(mmapload.MmapLoadWarning, match="targets pattern 'q_proj' matches no tensor"):
        stream_quantize(src, targets=["q_proj"])
    with pytest.warns(mmapload.MmapLoadWarning, match="ignore pattern 'typo' matches no tensor"):
        stream_quantize(src, ignore=["typo"])


@pytest.mark.parametrize("value", [0.0, -0.01, float("nan"), float("inf")])
def test_an_fp8_source_scale_that_cannot_dequantize_is_an_error(tmp_path, value, no_thread_leak):
    q = torch.randn(16, 16).to(torch.float8_e4m3fn)
    save_file({"l.weight": q, "l.weight_scale": torch.tensor([value])}, tmp_path / "m.safetensors")
    with pytest.raises(mmapload.NonFiniteError, match=r"m\.safetensors: scale 'l\.weight_scale' of FP8 weight"):
        stream_quantize(tmp_path / "m.safetensors")


@pytest.mark.parametrize("qcfg,match", [
    ({"quant_method": "fp8", "weight_block_size": 32}, r"weight_block_size is 32; it must be two positive ints"),
    ({"quant_method": "fp8", "weight_block_size": [0, 32]}, r"weight_block_size is \[0, 32\]"),
    ({"quant_method": "compressed-tensors", "format": "float-quantized", "config_groups": [1]},
     "config_groups must map group names to schemes"),
])
def test_odd_quantization_configs_are_typed_errors(tmp_path, qcfg, match, capsys):
    src, _, _ = _fp8_source(tmp_path / "m", (64, 64), (32, 32), None)
    (src / "config.json").write_text(json.dumps({"model_type": "llama", "quantization_config": qcfg}))
    with pytest.raises(mmapload.CheckpointError, match=match):
        stream_quantize(src)
    assert main(["convert", str(src), str(tmp_path / "out")]) == 2
    assert "Traceback" not in capsys.readouterr().err


def test_bf16_scales_pair_and_bare_fp8_needs_a_scale_everywhere(tmp_path):
    from torch import nn
    from mmapload.nn import FP8Linear, ModuleMismatchError, load_into
    q = torch.randn(16, 32).to(torch.float8_e4m3fn)
    save_file({"l.weight": q, "l.weight_scale": torch.tensor(0.5, dtype=torch.bfloat16)}, tmp_path / "a.safetensors")
    got = stream_quantize(tmp_path / "a.safetensors")["l.weight"]     # compressed-tensors' bf16 scales pair
    assert isinstance(got, QuantizedTensor) and got.scale.dtype == torch.float32 and float(got.scale) == 0.5
    save_file({"l.weight": q}, tmp_path / "b.safetensors")
    with torch.device("meta"):
        m = nn.Sequential()
        m.add_module("l", nn.Linear(32, 16, bias=False))
    with pytest.raises(ModuleMismatchError, match="'l.weight' is FP8 without a scale.*fp8_weight_scale"):
        load_into(m, tmp_path / "b.safetensors")                     # raw FP8 codes never reach a float param
    with torch.device("meta"):
        m = nn.Sequential()
        m.add_module("l", nn.Linear(32, 16, bias=False))
    load_into(m, tmp_path / "b.safetensors", fp8_weight_scale=0.25)
    assert isinstance(m.l, FP8Linear) and float(m.l.weight_scale) == 0.25
    assert torch.equal(m.l.dequantized_weight(), q.float() * 0.25)


@pytest.mark.parametrize("extra,cfg,name", [
    ({"model.layers.1.mlp.up_proj.weight": torch.zeros(8, 4, dtype=torch.int8),
      "model.layers.1.mlp.up_proj.SCB": torch.ones(8)}, None, "bitsandbytes int8"),
    ({"model.layers.1.mlp.up_proj.weight": torch.zeros(8, 4, dtype=torch.int8)},
     {"quant_method": "compressed-tensors", "format": "naive-quantized",
      "config_groups": {"g": {"targets": ["Linear"], "weights": {"num_bits": 8, "type": "int"}}}}, "naive-quantized"),
])
def test_more_sources_of_other_methods_are_refused(tmp_path, extra, cfg, name):
    src = _llama_like(tmp_path / "m", {"model_type": "llama"} | ({"quantization_config": cfg} if cfg else {}), extra)
    with pytest.raises(QuantizedSourceError, match=name):
        convert(src, tmp_path / "out", policy="names")


@pytest.mark.parametrize("size", [1 << 20, 32 << 20])
def test_generated_checkpoints_match_their_config(tmp_path, size):
    """synth.py's config.json describes the shapes it writes at every size (a 32 MiB demo's
    k_proj once disagreed with its head count, so the policy warned and fell back to names)."""
    import warnings
    from mmapload.synth import make_llama_checkpoint
    ckpt = make_llama_checkpoint(tmp_path, size, shards=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error", mmapload.MmapLoadWarning)
        model = stream_quantize(ckpt, "cpu")
    assert model.report.policy == "LlamaForCausalLM"


def test_a_skip_pattern_that_matches_nothing_is_said(tmp_path):
    path = _llama_like(tmp_path / "m")
    with pytest.warns(mmapload.MmapLoadWarning, match="skip pattern 'q_porj' matches no tensor"):
        stream_quantize(path, skip=["q_porj"], policy="names")
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error", mmapload.MmapLoadWarning)
        stream_quantize(path, skip=["q_proj"], policy="names")   # matches: no warning


def test_warnings_point_at_the_callers_line(tmp_path):
    """MmapLoadWarnings name the line that called the verb (not a line inside mmapload), for the
    verbs and depths that raise them: a skip typo in stream_quantize and in convert."""
    import warnings
    path = _llama_like(tmp_path / "m")
    for call in (lambda: stream_quantize(path, skip=["q_porj"], policy="names"),
                 lambda: convert(path, tmp_path / "out", skip=["q_porj"], policy="names")):
        with warnings.catch_warnings(record=True) as got:
            warnings.simplefilter("always")
            call()
        mine = [w for w in got if issubclass(w.category, mmapload.MmapLoadWarning)]
        assert mine and all(w.filename == __file__ for w in mine), [(w.filename, w.lineno) for w in mine]
