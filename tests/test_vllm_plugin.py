"""The vLLM plugin (``--load-format mmapload``) inside a real vLLM (vllm-cpu 0.32 in CI's own venv).

Every vLLM run is a fresh process (tests/vllm_child.py): a tiny random bf16 Llama (built here with
transformers), (a) converted by ``convert`` (compressed-tensors, channel) and loaded by vLLM's default
loader, (b) loaded from bf16 with ``load_format="mmapload"``. (a) and (b) hold the same FP8 weights, so
their logprobs are equal; both stay within FP8 noise of the bf16 model, and a copy of (a) with its
scales shuffled does not (the check can fail). Skipped where vLLM is not installed.
"""

import importlib.metadata
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

pytest.importorskip("vllm")
pytestmark = pytest.mark.vllm

CHILD = Path(__file__).with_name("vllm_child.py")
ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1"}
PROMPTS = [[1] + list(range(17, 57)), [1, 5, 6, 7, 8, 9, 300, 301, 302, 400, 401, 100, 200, 50]]
AMX = bool(torch.cpu._is_amx_tile_supported())   # vLLM-CPU runs per-tensor and block FP8 only with AMX
no_amx = pytest.mark.skipif(AMX, reason="this CPU has AMX: vLLM-CPU's FP8 tensor/block kernels may run here")


def _tiny_llama(out: Path, *, arch: str = "llama") -> Path:
    """A random bf16 Llama ("mixtral": MoE; "qwen2": q/k/v biases, tied lm_head), saved with transformers.
    Each output row of a Linear weight gets its own magnitude (log-normal), so per-channel scales differ
    and shuffling them shows."""
    import transformers as tf
    torch.manual_seed(0)
    shape = dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                 tie_word_embeddings=arch == "qwen2")
    if arch == "mixtral":
        model = tf.MixtralForCausalLM(tf.MixtralConfig(**shape, num_local_experts=4, num_experts_per_tok=2))
    else:
        model = (tf.Qwen2ForCausalLM(tf.Qwen2Config(**shape)) if arch == "qwen2" else
                 tf.LlamaForCausalLM(tf.LlamaConfig(**shape)))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2:
                p.normal_(0, 0.05)
                if "embed" not in name:
                    p.mul_(torch.exp(torch.randn(p.shape[0], 1) * 0.5))
    model.to(torch.bfloat16).save_pretrained(out)
    return out


def _shuffle_scales(src: Path, dst: Path) -> Path:
    from safetensors.torch import load_file, save_file
    shutil.copytree(src, dst)
    g = torch.Generator().manual_seed(1)
    for f in dst.glob("*.safetensors"):
        t = load_file(f)
        for k in [k for k in t if k.endswith(".weight_scale")]:
            t[k] = t[k][torch.randperm(t[k].shape[0], generator=g)]
        save_file(t, f, metadata={"format": "pt"})
    return dst


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from mmapload import convert
    root = tmp_path_factory.mktemp("vllm")
    bf16 = _tiny_llama(root / "tiny")
    ch = convert(bf16, root / "tiny-fp8-channel", granularity="channel")
    return {"root": root, "bf16": bf16, "channel": ch, "shuffled": _shuffle_scales(ch, root / "tiny-shuffled")}


_RUNS: dict = {}


def run_vllm(root: Path, model: Path, load_format: str = "auto", extra=None, tp: int = 1, env=None):
    """vLLM's results (or its error chain) for ``PROMPTS``; (stdout+stderr) in ``["log"]``. Cached per args."""
    key = (str(model), load_format, json.dumps(extra, sort_keys=True), tp)
    if key in _RUNS:
        return _RUNS[key]
    tag = f"run{len(_RUNS)}"
    spec, out = root / f"{tag}.spec.json", root / f"{tag}.out.json"
    spec.write_text(json.dumps({"model": str(model), "load_format": load_format, "extra": extra, "tp": tp,
                                "prompts": PROMPTS}))
    proc = subprocess.run([sys.executable, str(CHILD), str(spec), str(out)], capture_output=True, text=True,
                          timeout=600, env={**os.environ, **ENV, **(env or {})}, cwd=root)
    assert out.exists(), f"vLLM child died (rc {proc.returncode}): {proc.stderr[-3000:]}"
    res = json.loads(out.read_text()) | {"log": proc.stdout + proc.stderr}
    _RUNS[key] = res
    return res


def _ok(res: dict) -> dict:
    assert res["ok"], f"vLLM failed: {res['chain']}\n{res['log'][-3000:]}"
    return res


def _prompt_token_logprobs(res: dict) -> torch.Tensor:
    """The logprob vLLM gives each prompt token after its prefix (teacher forced: comparable across
    models even where their greedy continuations differ)."""
    return torch.tensor([lp[str(p[i])] for r, p in zip(res["results"], PROMPTS)
                         for i, lp in enumerate(r["prompt_logprobs"]) if lp is not None])


def test_the_entry_point_registers_the_mmapload_load_format():
    eps = {e.name: e.value for e in importlib.metadata.entry_points(group="vllm.general_plugins")}
    assert eps.get("mmapload") == "mmapload.integrations.vllm:register"
    from vllm.model_executor import model_loader
    from vllm.plugins import load_general_plugins
    load_general_plugins()
    cls = model_loader._LOAD_FORMAT_TO_MODEL_LOADER["mmapload"]
    assert cls.__module__ == "mmapload.integrations.vllm" and cls.__name__ == "MmapLoadModelLoader"


def test_plugin_gives_vllm_the_weights_convert_writes(models):
    converted = _ok(run_vllm(models["root"], models["channel"]))
    plugin = _ok(run_vllm(models["root"], models["bf16"], "mmapload"))
    assert "streamed to FP8 (channel scales" in plugin["log"]
    assert [r["tokens"] for r in plugin["results"]] == [r["tokens"] for r in converted["results"]]
    assert plugin["results"] == converted["results"]   # every top-5 logprob, prompt and sample, equal


def test_a_tied_lm_head_and_qkv_biases_load_as_convert_writes_them(models):
    from mmapload import convert
    qwen2 = _tiny_llama(models["root"] / "tiny-qwen2", arch="qwen2")   # lm_head is the embedding: no tensor
    converted = _ok(run_vllm(models["root"], convert(qwen2, models["root"] / "tiny-qwen2-fp8",
                                                     granularity="channel")))
    plugin = _ok(run_vllm(models["root"], qwen2, "mmapload"))
    assert plugin["results"] == converted["results"]


def test_gpt2_conv1d_layers_stay_bf16_in_vllm_and_the_output_is_the_models(models):
    """GPT-2's Conv1D weights are kept bf16 and listed in ``ignore`` (vLLM builds Linear layers for them:
    unlisted, it made FP8 layers without scales and generated NaN)."""
    import transformers as tf
    from mmapload import convert
    torch.manual_seed(0)
    gpt2 = models["root"] / "tiny-gpt2"
    tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=512, n_embd=128, n_layer=2, n_head=4, n_positions=128,
                                     bos_token_id=1, eos_token_id=2)).to(torch.bfloat16).save_pretrained(gpt2)
    converted = _ok(run_vllm(models["root"], convert(gpt2, models["root"] / "tiny-gpt2-fp8", granularity="channel")))
    plugin = _ok(run_vllm(models["root"], gpt2, "mmapload"))
    assert plugin["results"] == converted["results"]
    bf16 = _prompt_token_logprobs(_ok(run_vllm(models["root"], gpt2)))
    got = _prompt_token_logprobs(plugin)
    assert torch.isfinite(got).all() and (got - bf16).abs().max() < 0.6


def test_fp8_logprobs_stay_within_fp8_noise_of_bf16_and_shuffled_scales_do_not(models):
    bf16 = _prompt_token_logprobs(_ok(run_vllm(models["root"], models["bf16"])))
    plugin = _prompt_token_logprobs(_ok(run_vllm(models["root"], models["bf16"], "mmapload")))
    shuffled = _prompt_token_logprobs(_ok(run_vllm(models["root"], models["shuffled"])))
    fp8_err, bad_err = (plugin - bf16).abs(), (shuffled - bf16).abs()
    # e4m3 keeps 3 mantissa bits (<= 6.25% per weight); measured here: mean 0.04, max 0.16 nats
    assert fp8_err.mean() < 0.15 and fp8_err.max() < 0.6, (fp8_err.mean(), fp8_err.max())
    # rows' scales permuted: measured mean 0.71, max 5.3 nats
    assert bad_err.mean() > 0.3 and bad_err.mean() > 5 * fp8_err.mean(), (bad_err.mean(), fp8_err.mean())


def test_bf16_scales_as_llm_compressor_writes_them_serve_like_the_converted_checkpoint(models):
    """scale_dtype="weight" (compressed-tensors' numerics, bf16 scales): the plugin and the
    converted checkpoint give vLLM the same model, within FP8 noise of bf16."""
    from mmapload import convert
    out = convert(models["bf16"], models["root"] / "tiny-fp8-channel-bf16-scales", granularity="channel",
                  scale_dtype="weight")
    converted = _ok(run_vllm(models["root"], out))
    plugin = _ok(run_vllm(models["root"], models["bf16"], "mmapload", {"scale_dtype": "weight"}))
    assert plugin["results"] == converted["results"]
    bf16 = _prompt_token_logprobs(_ok(run_vllm(models["root"], models["bf16"])))
    err = (_prompt_token_logprobs(plugin) - bf16).abs()
    assert err.mean() < 0.15 and err.max() < 0.6, (err.mean(), err.max())


def test_model_loader_extra_config_reaches_the_loader(models):
    extra = {"ring_bytes": 1 << 20, "io": "pread", "read_threads": 1}
    small = _ok(run_vllm(models["root"], models["bf16"], "mmapload", extra))
    assert "ring 1.0 MiB, io pread" in small["log"], small["log"][-2000:]
    assert small["results"] == _ok(run_vllm(models["root"], models["bf16"], "mmapload"))["results"]
    bad = run_vllm(models["root"], models["bf16"], "mmapload", {"ring_bytes": 1 << 20, "tp_size": 2})
    assert not bad["ok"] and any("'tp_size' is not for --load-format mmapload" in c for c in bad["chain"])


def test_tensor_parallel_workers_load_the_same_model_as_convert(models):
    env = {"VLLM_CPU_OMP_THREADS_BIND": "0|1"}   # vLLM-CPU binds one CPU per worker on a one-node host
    converted = _ok(run_vllm(models["root"], models["channel"], tp=2, env=env))
    plugin = _ok(run_vllm(models["root"], models["bf16"], "mmapload", tp=2, env=env))
    assert plugin["results"] == converted["results"]


# ---- start-up refusals: vLLM's own config objects, checked by the plugin before anything is read


def _engine_config(model: Path, **kw):
    from vllm.engine.arg_utils import EngineArgs
    return EngineArgs(model=str(model), load_format="mmapload", skip_tokenizer_init=True, max_model_len=128,
                      **kw).create_engine_config()


@pytest.mark.parametrize("extra, message", [
    ({"ring": 1}, r"unknown --model-loader-extra-config key\(s\) \['ring'\].*known: \['granularity'"),
    ({"fp8_dtype": "e5m2"}, r"'fp8_dtype' is not for --load-format mmapload: compressed-tensors"),
    ({"granularity": "row"}, r"granularity"),
    ({"ring_bytes": -1}, r"ring_bytes"),
    ([1, 2], r"must be a JSON object"),
])
def test_bad_loader_options_are_refused_when_vllm_builds_the_loader(extra, message):
    from vllm.config import LoadConfig
    from vllm.model_executor.model_loader import get_model_loader
    from vllm.plugins import load_general_plugins
    from mmapload import OptionsError
    load_general_plugins()
    with pytest.raises(OptionsError, match=message):
        get_model_loader(LoadConfig(load_format="mmapload", model_loader_extra_config=extra))


def test_unsupported_setups_are_refused_at_startup(models, tmp_path):
    from mmapload import OptionsError, QuantizedSourceError
    from mmapload.integrations.vllm import check_supported, loader_options
    channel = loader_options(None)
    check_supported(_engine_config(models["bf16"]), channel)   # the supported case passes
    with pytest.raises(QuantizedSourceError, match="already quantized \\(compressed-tensors\\).*default"):
        check_supported(_engine_config(models["channel"]), channel)
    with pytest.raises(OptionsError, match="drop --quantization fp8_per_channel"):
        check_supported(_engine_config(models["bf16"], quantization="fp8_per_channel"), channel)
    with pytest.raises(OptionsError, match="mixture-of-experts.*mmapload convert"):
        check_supported(_engine_config(_tiny_llama(tmp_path / "mixtral", arch="mixtral")), channel)
    if not AMX:
        with pytest.raises(OptionsError, match="'tensor' scales only with AMX.*\"channel\""):
            check_supported(_engine_config(models["bf16"]), loader_options({"granularity": "tensor"}))


def test_a_refusal_surfaces_from_a_real_engine_start(models):
    res = run_vllm(models["root"], models["channel"], "mmapload")
    assert not res["ok"]
    assert any("QuantizedSourceError" in c and "already quantized" in c for c in res["chain"]), res["chain"]


# ---- the layouts vLLM-CPU reads but does not run: the refusal must stay vLLM-CPU's own


@no_amx
@pytest.mark.parametrize("fmt, granularity, refusal", [
    ("compressed-tensors", "tensor", r"static_scaled_fp8_quant\(\) expected at most 0 argument"),
    ("compressed-tensors", "block", r"Failed to find a kernel.*requires AMX tile support"),
    ("fp8", "tensor", r"static_scaled_fp8_quant\(\) expected at most 0 argument"),
    ("fp8", "block", r"Failed to find a kernel.*requires AMX tile support"),
])
def test_other_converted_layouts_fail_inside_vllm_cpu_not_in_our_files(models, fmt, granularity, refusal):
    from mmapload import convert
    out = convert(models["bf16"], models["root"] / f"tiny-{fmt}-{granularity}", format=fmt,
                  granularity=granularity, block_size=(32, 32))
    res = run_vllm(models["root"], out)
    assert not res["ok"], "vLLM-CPU now runs this layout: update the README's vLLM table and this test"
    assert any(re.search(refusal, c, re.S) for c in res["chain"]), res["chain"]


# ---- the README's command: the OpenAI-compatible server, engine in its own process


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_readme_server_command_serves_a_bf16_checkpoint_as_fp8(models):
    from tokenizers import Tokenizer, models as tok_models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    served = models["root"] / "served"
    shutil.copytree(models["bf16"], served)
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {f"w{i}": i for i in range(3, 512)}
    tok = Tokenizer(tok_models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(served)
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k != "VLLM_ENABLE_V1_MULTIPROCESSING"}
    log = open(models["root"] / "server.log", "w")
    server = subprocess.Popen([sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(served),
                               "--load-format", "mmapload", "--port", str(port), "--max-model-len", "128",
                               "--enforce-eager"], env={**env, "VLLM_CPU_KVCACHE_SPACE": "1"},
                              stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 400
        while time.monotonic() < deadline:
            assert server.poll() is None, (models["root"] / "server.log").read_text()[-3000:]
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                time.sleep(1)
        else:
            pytest.fail("the server was not ready in 400 s: " + (models["root"] / "server.log").read_text()[-3000:])
        body = json.dumps({"model": str(served), "prompt": "w17 w42 w99", "max_tokens": 4, "temperature": 0})
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", body.encode(),
                                     {"Content-Type": "application/json"})
        answer = json.load(urllib.request.urlopen(req, timeout=120))
        assert answer["usage"]["completion_tokens"] == 4 and answer["choices"][0]["text"].strip()
    finally:
        os.killpg(server.pid, 15)
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:   # a server stuck in its shutdown must not outlive the test
            os.killpg(server.pid, 9)
            server.wait(10)
        log.close()
    text = (models["root"] / "server.log").read_text()
    assert "streamed to FP8 (channel scales" in text and "CompressedTensorsW8A8Fp8" in text, text[-3000:]
