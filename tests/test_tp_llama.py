"""A tiny Llama run with tensor parallelism from the ranks' FP8 weights matches the TP=1 FP8 run.

A transformers ``LlamaForCausalLM`` (hidden 64, 4 heads of 16, 2 kv heads, intermediate 128, 2
layers, vocab 256; random bf16 weights) is saved with ``save_pretrained``. The TP=1 reference is
the float32 computation from ``stream_quantize``'s dequantized FP8 weights (granularity "tensor",
"channel", "block" 16x16): decoder layer 0 (RMSNorm, q/k/v, Llama's RoPE, causal GQA attention,
o_proj, residual, RMSNorm, silu(gate) * up -> down_proj, residual) on a fixed random hidden state,
and the whole model (vocab-parallel embedding, both layers, norm, lm_head) on fixed token ids.
``_forward`` is checked against transformers' own modules fed the same dequantized weights.

At TP=2 and TP=4 (kv heads replicated: each of the 2 kv heads serves 2 ranks) every rank of a gloo
world loads with ``tp_size`` and runs the same ``_forward`` on its local heads / intermediate
columns / vocabulary rows: the row-parallel outputs (o_proj, down_proj) and the masked embedding
are all-reduced (SUM), the lm_head logits all-gathered. Each rank's outputs must equal the TP=1
FP8 outputs within RTOL=1e-4, ATOL=1e-5 (float32): the dequantized weights are the same numbers,
only the summation order of the split contractions differs.

The tolerance is shown to mean something: controls run through the same all-reduced computation
and must NOT match: one rank's kv-head slice or down_proj slice swapped with another rank's, the
row-parallel down_proj quantized with the rank's own amax (what a missing amax all-reduce would
give; "tensor" / "channel"), o_proj's scales rolled by one row ("channel" / "block"), a single FP8
code of one rank moved by one step, and (TP=1) the bf16 weights instead of the FP8 ones.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from tpworld import run_world

from mmapload import stream_quantize
from mmapload.fp8 import quantize
from mmapload.result import QuantizedTensor
from mmapload.tp import shard_of
from mmapload.tp_ranges import take

RTOL, ATOL = 1e-4, 1e-5
GRANULARITIES = ("tensor", "channel", "block")
BLOCK = (16, 16)
HEAD_DIM, LAYERS, VOCAB, BATCH, TOKENS = 16, 2, 256, 2, 6
L0 = "model.layers.0."
DOWN0, O0 = L0 + "mlp.down_proj.weight", L0 + "self_attn.o_proj.weight"
PROJECTIONS = [f"self_attn.{n}_proj" for n in "qkvo"] + [f"mlp.{n}_proj" for n in ("gate", "up", "down")]
OUTPUTS = ("attn", "mlp", "block", "logits")   # layer 0's all-reduced o_proj / down_proj, its output; logits


def _transformers():
    return pytest.importorskip("transformers")   # not at import: the spawned ranks need not import it


def _config():
    return _transformers().LlamaConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=LAYERS,
                                       num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
                                       attn_implementation="eager")


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """(checkpoint folder, inputs): the saved bf16 model; fixed ids, hidden state, RoPE cos/sin, eps."""
    transformers = _transformers()
    folder = tmp_path_factory.mktemp("tp_llama")
    config = _config()
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():   # wider than the default init (FP8 noise visible); norms not all ones
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.05 if p.dim() >= 2 else 1 + 0.2 * torch.randn_like(p))
    model.to(torch.bfloat16).save_pretrained(folder / "ckpt")
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (BATCH, TOKENS), generator=g)
    x = torch.randn(BATCH, TOKENS, 64, generator=g)
    rope = transformers.models.llama.modeling_llama.LlamaRotaryEmbedding(config)
    cos, sin = rope(x, torch.arange(TOKENS)[None])
    return folder / "ckpt", dict(ids=ids, x=x, cos=cos, sin=sin, eps=config.rms_norm_eps)


# --- the computation: the same function at TP=1 (reduce / gather: identity) and on every rank ---

def _rms(x, w, eps):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _layer(W, i, x, inp, reduce):
    """Decoder layer ``i`` on the weights ``W`` this rank holds (its heads: from the shapes)."""
    p, (b, t, _) = f"model.layers.{i}.", x.shape
    nh = W[p + "self_attn.q_proj.weight"].shape[0] // HEAD_DIM
    nkv = W[p + "self_attn.k_proj.weight"].shape[0] // HEAD_DIM
    cos, sin = inp["cos"].unsqueeze(1), inp["sin"].unsqueeze(1)
    h = _rms(x, W[p + "input_layernorm.weight"], inp["eps"])
    q, k, v = ((h @ W[p + f"self_attn.{n}_proj.weight"].T).view(b, t, -1, HEAD_DIM).transpose(1, 2) for n in "qkv")
    q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
    k, v = k.repeat_interleave(nh // nkv, dim=1), v.repeat_interleave(nh // nkv, dim=1)   # GQA
    s = (q @ k.transpose(-1, -2)) * HEAD_DIM ** -0.5
    s = s.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
    o = (s.softmax(-1) @ v).transpose(1, 2).reshape(b, t, nh * HEAD_DIM)
    attn = reduce(o @ W[p + "self_attn.o_proj.weight"].T)                      # row-parallel
    x = x + attn
    h = _rms(x, W[p + "post_attention_layernorm.weight"], inp["eps"])
    mlp = reduce((F.silu(h @ W[p + "mlp.gate_proj.weight"].T) * (h @ W[p + "mlp.up_proj.weight"].T))
                 @ W[p + "mlp.down_proj.weight"].T)                             # row-parallel
    return x + mlp, attn, mlp


def _forward(W, inp, rank=0, reduce=lambda t: t, gather=lambda t: t):
    block, attn, mlp = _layer(W, 0, inp["x"], inp, reduce)
    table = W["model.embed_tokens.weight"]                                      # this rank's vocab rows
    lo = rank * table.shape[0]
    ids, mine = inp["ids"] - lo, (inp["ids"] >= lo) & (inp["ids"] < lo + table.shape[0])
    h = reduce(table[ids.clamp(0, table.shape[0] - 1)] * mine.unsqueeze(-1))
    for i in range(LAYERS):
        h = _layer(W, i, h, inp, reduce)[0]
    logits = gather(_rms(h, W["model.norm.weight"], inp["eps"]) @ W["lm_head.weight"].T)
    return dict(attn=attn, mlp=mlp, block=block, logits=logits)


def _float32(model) -> dict[str, torch.Tensor]:
    return {n: t.dequantize(torch.float32) if isinstance(t, QuantizedTensor) else t.float() for n, t in model.items()}


def _load(folder, granularity, **kw):
    """policy="names" (the same tensors as "auto" here, without building the model on meta per rank)."""
    model = stream_quantize(folder, "cpu", granularity=granularity, block_size=BLOCK, policy="names", **kw)
    fp8 = {n for n, t in model.items() if isinstance(t, QuantizedTensor)}
    assert fp8 == {f"model.layers.{i}.{m}.weight" for i in range(LAYERS) for m in PROJECTIONS}, fp8
    return model


def _diff(a, b) -> float:
    return (a - b).abs().max().item()


def _excess(a, b) -> float:
    """max |a - b| / (ATOL + RTOL |b|): <= 1 is within the tolerance."""
    return ((a - b).abs() / (ATOL + RTOL * b.abs())).max().item()


def _close(a, b) -> bool:
    return torch.allclose(a, b, rtol=RTOL, atol=ATOL)


# --- on each rank ---

def _one_step(q: QuantizedTensor) -> QuantizedTensor:
    """``q`` with its largest-magnitude FP8 code moved one step toward zero (never NaN)."""
    data = q.data.clone()
    codes = data.view(torch.uint8).view(-1)
    i = q.data.float().abs().view(-1).argmax()
    codes[i] -= 1
    return dataclasses.replace(q, data=data)


def _rank_run(rank, world, folder, inp):
    import torch.distributed as dist
    from safetensors import safe_open

    def reduce(t):
        t = t.contiguous()
        dist.all_reduce(t)
        return t

    def gather(t):
        parts = [torch.empty_like(t) for _ in range(world)]
        dist.all_gather(parts, t.contiguous())
        return torch.cat(parts, dim=-1)

    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        down_bf16 = f.get_tensor(DOWN0)
    mine = take(down_bf16, shard_of(DOWN0, tuple(down_bf16.shape), rank, world))
    out, kv_peer, down_peer = {}, (rank + world // 2) % world, (rank + 1) % world
    for g in GRANULARITIES:
        model = _load(folder, g, tp_size=world, tp_timeout=60)
        W = _float32(model)
        peers = [None] * world
        dist.all_gather_object(peers, {n: W[n] for n in (L0 + "self_attn.k_proj.weight",
                                                         L0 + "self_attn.v_proj.weight", DOWN0)})
        variants = {
            "tp": W,
            "swap_kv": {**W, **{n: peers[kv_peer][n] for n in (L0 + "self_attn.k_proj.weight",
                                                               L0 + "self_attn.v_proj.weight")}},
            "swap_down": {**W, DOWN0: peers[down_peer][DOWN0]},
            "one_code": {**W, DOWN0: _one_step(model[DOWN0]).dequantize(torch.float32)} if rank == world - 1 else W,
        }
        if g != "block":   # block scales are per block: no all-reduce to miss
            data, scale = quantize(mine, g, model[DOWN0].data.dtype)
            variants["local_amax"] = {**W, DOWN0: dataclasses.replace(model[DOWN0], data=data, scale=scale)
                                      .dequantize(torch.float32)}
        if g != "tensor":  # a per-tensor scale has nothing to roll
            o = model[O0]
            rolled = dataclasses.replace(o, scale=o.scale.roll(1, 0))
            variants["scale_roll"] = {**W, O0: rolled.dequantize(torch.float32)}
        out[g] = {name: _forward(Wv, inp, rank, reduce, gather) for name, Wv in variants.items()}
        out[g]["shapes"] = {n: tuple(t.shape) for n, t in W.items()}
    return out


# --- the tests ---

def test_the_reference_computation_is_llamas(llama):
    """``_forward`` at TP=1 equals transformers' LlamaForCausalLM / LlamaDecoderLayer (eager, float32)
    fed the same dequantized FP8 weights: the RoPE, GQA, norms and MLP are Llama's."""
    folder, inp = llama
    for g in GRANULARITIES:
        W = _float32(_load(folder, g))
        ours = _forward(W, inp)
        model = _transformers().LlamaForCausalLM(_config()).float().eval()
        model.load_state_dict(W, strict=True)
        with torch.no_grad():
            logits = model(input_ids=inp["ids"]).logits
            mask = torch.full((TOKENS, TOKENS), torch.finfo(torch.float32).min).triu(1)[None, None]
            block = model.model.layers[0](inp["x"], attention_mask=mask, position_embeddings=(inp["cos"], inp["sin"]))
        block = block[0] if isinstance(block, tuple) else block
        torch.testing.assert_close(ours["logits"], logits, rtol=RTOL, atol=ATOL)
        torch.testing.assert_close(ours["block"], block, rtol=RTOL, atol=ATOL)


@pytest.mark.timeout(240)
@pytest.mark.parametrize("world", [2, 4])
def test_tp_llama_from_the_ranks_fp8_weights_matches_tp1(llama, tmp_path, world):
    """Every rank's all-reduced outputs == the TP=1 FP8 outputs (RTOL / ATOL); every control != them."""
    folder, inp = llama
    results = run_world(_rank_run, world, tmp_path, folder, inp, deadline=180)
    for r in results:
        assert r[0] == "ok", r
    report = {}   # (granularity, variant) -> [max |TP - TP1| over ranks and outputs, its worst share of the tolerance]

    def note(g, name, a, b):
        r = report.setdefault((g, name), [0.0, 0.0] if name == "tp" else [float("inf"), float("inf")])
        pick = max if name == "tp" else min
        r[0], r[1] = pick(r[0], _diff(a, b)), pick(r[1], _excess(a, b))

    for g in GRANULARITIES:
        full = _load(folder, g)
        ref = _forward(_float32(full), inp)
        if g == "tensor":   # FP8 noise itself is far outside the tolerance
            bf16 = _forward({n: t.float() for n, t in load_file(folder / "model.safetensors").items()}, inp)
            for key in ("block", "logits"):
                assert not _close(bf16[key], ref[key]), key
                note("-", "bf16 weights at TP=1", bf16[key], ref[key])
        for rank, (_, out) in enumerate(results):
            got = out[g]
            # the ranks held their slices: local heads / intermediate columns / vocab rows
            assert got["shapes"][L0 + "self_attn.q_proj.weight"] == (64 // world, 64)
            assert got["shapes"][L0 + "self_attn.k_proj.weight"] == (16, 64)   # one kv head (TP=4: shared)
            assert got["shapes"][DOWN0] == (64, 128 // world)
            assert got["shapes"]["lm_head.weight"] == (VOCAB // world, 64)
            for key in OUTPUTS:
                torch.testing.assert_close(got["tp"][key], ref[key], rtol=RTOL, atol=ATOL,
                                           msg=lambda m, w=f"{g} rank {rank} of {world}: {key}": f"{w}: {m}")
                note(g, "tp", got["tp"][key], ref[key])
            for name, o in got.items():
                if name in ("tp", "shapes"):
                    continue
                for key in ("block", "logits"):   # every control reaches layer 0's output and the logits
                    assert not _close(o[key], ref[key]), (g, rank, world, name, key, _diff(o[key], ref[key]))
                    note(g, name, o[key], ref[key])
    print(f"\nTP={world} vs TP=1, max |diff| and max |diff| / (atol + rtol |ref|) (tp: worst; controls: least):\n  "
          + "\n  ".join(f"{g:8} {n:20} {d:.1e} {x:9.3g}" for (g, n), (d, x) in report.items()))
