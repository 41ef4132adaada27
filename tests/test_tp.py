"""mmapload.tp: each rank's slice of each tensor, as vLLM lays them out, and the bytes it reads."""

import pytest
import torch
from hypothesis import given, settings, strategies as st

from mmapload import fp8
from mmapload.errors import OptionsError, TPError
from mmapload.tp import Heads, Sharding, shard_of, sharding_of, tp_plan
from mmapload.tp_ranges import byte_ranges, scale_slice, strided_ranges, take

HIDDEN, HEADS, HEAD_DIM, INTER, VOCAB, EXPERTS = 64, 8, 8, 128, 256, 4
TP_SIZES = (1, 2, 4, 8)
L = "model.layers.0."


def llama(kv):
    """name -> (shape, reference kind) of a Llama / Qwen2 / Mixtral-shaped layer with ``kv`` kv heads.
    kind: "rep" | "col" | "row" | ("heads", n, kv?) | ("parts", (kind per part...), sizes)."""
    q, k = HEADS * HEAD_DIM, kv * HEAD_DIM
    head = lambda n, is_kv: ("heads", n, is_kv)
    return {
        "model.embed_tokens.weight": ((VOCAB, HIDDEN), "col"),
        "lm_head.weight": ((VOCAB, HIDDEN), "col"),
        "model.norm.weight": ((HIDDEN,), "rep"),
        L + "input_layernorm.weight": ((HIDDEN,), "rep"),
        L + "self_attn.q_proj.weight": ((q, HIDDEN), head(HEADS, False)),
        L + "self_attn.q_proj.bias": ((q,), head(HEADS, False)),
        L + "self_attn.k_proj.weight": ((k, HIDDEN), head(kv, True)),
        L + "self_attn.k_proj.bias": ((k,), head(kv, True)),
        L + "self_attn.v_proj.weight": ((k, HIDDEN), head(kv, True)),
        L + "self_attn.o_proj.weight": ((HIDDEN, q), "row"),
        L + "self_attn.o_proj.bias": ((HIDDEN,), "rep"),
        L + "self_attn.qkv_proj.weight": ((q + 2 * k, HIDDEN),
                                          ("parts", (head(HEADS, False), head(kv, True), head(kv, True)), (q, k, k))),
        L + "self_attn.qkv_proj.bias": ((q + 2 * k,),
                                        ("parts", (head(HEADS, False), head(kv, True), head(kv, True)), (q, k, k))),
        L + "mlp.gate_proj.weight": ((INTER, HIDDEN), "col"),
        L + "mlp.up_proj.weight": ((INTER, HIDDEN), "col"),
        L + "mlp.down_proj.weight": ((HIDDEN, INTER), "row"),
        L + "mlp.gate_up_proj.weight": ((2 * INTER, HIDDEN), ("parts", ("col", "col"), (INTER, INTER))),
        L + "mlp.gate.weight": ((EXPERTS, HIDDEN), "rep"),                          # router
        L + "block_sparse_moe.experts.3.w1.weight": ((INTER, HIDDEN), "col"),
        L + "block_sparse_moe.experts.3.w3.weight": ((INTER, HIDDEN), "col"),
        L + "block_sparse_moe.experts.3.w2.weight": ((HIDDEN, INTER), "row"),
        L + "mlp.experts.gate_up_proj": ((EXPERTS, 2 * INTER, HIDDEN), ("parts", ("col", "col"), (INTER, INTER))),
        L + "mlp.experts.down_proj": ((EXPERTS, HIDDEN, INTER), "row"),
        L + "mlp.shared_expert.up_proj.weight": ((INTER, HIDDEN), "col"),
        "transformer.h.0.attn.c_attn.weight": ((HIDDEN, 3 * HIDDEN), "rep"),   # GPT-2 Conv1D [in, out]
        L + "self_attn.q_proj.weight_scale": ((q, 1), "rep"),                   # scales: scale_slice
    }


def reference(t, kind, r, tp):
    """Rank r's tensor, from torch.chunk per logical part (vLLM: q by heads; kv head r*kv//tp)."""
    if kind == "rep":
        return t
    dim = t.dim() - 1 if kind == "row" or t.dim() == 1 else t.dim() - 2
    if kind in ("col", "row"):
        return torch.chunk(t, tp, dim)[r]
    if kind[0] == "heads":
        _, n, is_kv = kind
        return torch.chunk(t, n, dim)[r * n // tp] if is_kv and n < tp else torch.chunk(t, tp, dim)[r]
    kinds, sizes = kind[1], kind[2]
    return torch.cat([reference(p, k, r, tp) for p, k in zip(torch.split(t, sizes, dim), kinds)], dim)


def full(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).to(torch.bfloat16)


def read(buf: bytes, ranges):
    return b"".join(buf[lo:hi] for lo, hi in ranges)


def raw(t):
    return t.contiguous().view(torch.uint8).numpy().tobytes()


HEADS_OF = {kv: Heads(HEADS, kv, HEAD_DIM) for kv in (8, 2, 1)}


@pytest.mark.parametrize("kv", [8, 2, 1])          # MHA, GQA with kv < tp for tp 4 / 8, MQA
@pytest.mark.parametrize("tp", TP_SIZES)
def test_llama_slices_match_the_chunk_reference_and_the_file_bytes(kv, tp):
    for name, (shape, kind) in llama(kv).items():
        t = full(shape, seed=len(name))
        start = 4096 + 24                                                        # after a header
        buf = bytes(start) + raw(t)
        pieces = []
        for r in range(tp):
            sl = shard_of(name, shape, r, tp, heads=HEADS_OF[kv])
            want = reference(t, kind, r, tp)
            got = take(t, sl)
            assert sl.shape == tuple(want.shape), (name, r)
            assert torch.equal(got, want), (name, r, tp)
            assert read(buf, byte_ranges(start, shape, 2, sl)) == raw(want), (name, r)
            pieces.append(got)
        if kind == "rep":
            assert all(p is t for p in pieces)
            continue
        # all ranks together rebuild the tensor: per part, the distinct ranks in vLLM's order
        dim = sl.dim
        kinds, sizes = (kind[1], kind[2]) if kind[0] == "parts" else ((kind,), (shape[dim],))
        widths = [reference(p, k, 0, tp).shape[dim] for p, k in zip(torch.split(t, sizes, dim), kinds)]
        rebuilt = []
        for i, k in enumerate(kinds):
            replicas = tp // k[1] if k[0] == "heads" and k[2] and k[1] < tp else 1
            per = [torch.split(p, widths, dim)[i] for p in pieces]
            rebuilt += per[::replicas]
            assert all(torch.equal(per[r], per[r - r % replicas]) for r in range(tp))
        assert torch.equal(torch.cat(rebuilt, dim), t), name


def test_kv_heads_fewer_than_tp_are_replicated_as_vllm_does():
    # 2 kv heads over tp=8: kv_head_replicas = 4, rank r holds kv head r // 4 (= r * 2 // 8)
    name, shape = L + "self_attn.qkv_proj.weight", ((HEADS + 4) * HEAD_DIM, HIDDEN)
    q, k = HEADS * HEAD_DIM, 2 * HEAD_DIM
    for r in range(8):
        sl = shard_of(name, shape, r, 8, heads=Heads(HEADS, 2, HEAD_DIM))
        h = r // 4
        assert sl.ranges == ((r * HEAD_DIM, (r + 1) * HEAD_DIM), (q + h * HEAD_DIM, q + (h + 1) * HEAD_DIM),
                             (q + k + h * HEAD_DIM, q + k + (h + 1) * HEAD_DIM))
        assert sl.shape == (3 * HEAD_DIM, HIDDEN)


def test_row_slices_are_one_range_per_row_and_one_strided_run():
    name, shape = L + "self_attn.o_proj.weight", (6, 16)
    t = full(shape)
    buf = bytes(100) + raw(t)
    for r in range(4):
        sl = shard_of(name, shape, r, 4)
        assert (sl.dim, sl.ranges, sl.shape) == (1, ((4 * r, 4 * r + 4),), (6, 4))
        ranges = byte_ranges(100, shape, 2, sl)
        assert ranges == [(100 + row * 32 + 8 * r, 100 + row * 32 + 8 * r + 8) for row in range(6)]
        assert read(buf, ranges) == raw(t[:, 4 * r:4 * r + 4].contiguous())
        (run,) = strided_ranges(100, shape, 2, sl)
        assert run == (100 + 8 * r, 8, 32, 6)
        assert [(run.first_lo + i * run.stride, run.first_lo + i * run.stride + run.length)
                for i in range(run.count)] == ranges
    # a column slice of a matrix is one range per part; tp=1 of a row weight is the whole tensor
    assert byte_ranges(0, (8, 16), 2, shard_of(L + "mlp.up_proj.weight", (8, 16), 1, 2)) == [(128, 256)]
    assert byte_ranges(7, shape, 2, shard_of(name, shape, 0, 1)) == [(7, 7 + 6 * 32)]
    assert byte_ranges(7, (5,), 4, shard_of("model.norm.weight", (5,), 1, 2)) == [(7, 27)]
    assert strided_ranges(7, (5,), 4, shard_of("model.norm.weight", (5,), 1, 2)) == [(7, 20, 20, 1)]


def test_fused_expert_strided_runs_interleave_parts_per_expert():
    name, shape = L + "mlp.experts.gate_up_proj", (3, 8, 4)
    t = full(shape)
    sl = shard_of(name, shape, 1, 2)
    assert sl.ranges == ((2, 4), (6, 8)) and sl.shape == (3, 4, 4)
    runs = strided_ranges(0, shape, 2, sl)
    assert runs == [(2 * 8, 16, 64, 3), (6 * 8, 16, 64, 3)]
    expanded = [(run.first_lo + e * run.stride, run.first_lo + e * run.stride + run.length)
                for e in range(3) for run in runs]
    assert read(raw(t), expanded) == raw(take(t, sl)) == read(raw(t), byte_ranges(0, shape, 2, sl))


def test_plan_overrides_the_default_rule():
    attn = "transformer.h.0.attn.c_attn.weight"
    assert sharding_of(attn, (64, 192)) == Sharding(None)
    assert sharding_of(attn, (64, 192), plan={"re:transformer\\.h\\.\\d+\\.attn\\.c_attn": "row"}).dim == 1
    q = L + "self_attn.q_proj"
    plan = {q: "replicate", "re:.*mlp\\.gate$": "column"}
    assert shard_of(q + ".weight", (64, 64), 1, 2, plan=plan).dim is None
    assert shard_of(q + ".bias", (64,), 1, 2, plan=plan).dim is None
    assert shard_of(L + "mlp.gate.weight", (4, 64), 1, 2, plan=plan).ranges == ((2, 4),)
    assert shard_of(L + "mlp.up_proj.weight", (8, 4), 1, 2, plan=tp_plan(plan)).ranges == ((4, 8),)
    assert shard_of(L + "mlp.up_proj.weight", (6, 4), 1, 2, fused=(2, 4)).ranges == ((1, 2), (4, 6))
    # an exact tensor name; a rule on a module does not shard its bias along a row split
    assert shard_of(L + "mlp.down_proj.weight", (4, 8), 0, 2, plan={L + "mlp.down_proj.weight": "column"}).dim == 0
    assert shard_of(L + "mlp.down_proj.bias", (4,), 1, 2).dim is None


@pytest.mark.parametrize("granularity", ["tensor", "channel", "block"])
@pytest.mark.parametrize("name,shape,heads,tps", [
    (L + "self_attn.qkv_proj.weight", ((HEADS + 4) * 16, 64), Heads(HEADS, 2, 16), (1, 2, 4)),
    (L + "mlp.down_proj.weight", (32, 128), None, (1, 2, 4)),
    (L + "mlp.gate_proj.weight", (128, 48), None, (1, 2, 4)),
    (L + "mlp.up_proj.weight", (136, 40), None, (1,)),                          # ragged last block
    (L + "mlp.down_proj.weight", (40, 120), None, (1,)),
    (L + "mlp.experts.gate_up_proj", (2, 128, 48), None, (1, 2, 4)),
    (L + "mlp.experts.down_proj", (2, 48, 128), None, (1, 2, 4)),
])
def test_rank_scales_are_the_tp1_scales_sliced(name, shape, heads, tps, granularity):
    """Quantized at TP=1, then sliced: each rank's (q, scale) dequantizes to its slice of the
    TP=1 result (the guarantee the TP load will keep)."""
    block = (16, 16)
    w = full(shape)
    q, scale = fp8.quantize(w, granularity, block_size=block)
    deq = fp8.dequantize(q, scale, granularity, block)
    for tp in tps:
        for r in range(tp):
            sl = shard_of(name, shape, r, tp, heads=heads, block=block if granularity == "block" else None)
            ssl = scale_slice(sl, scale.shape, block=block)
            rank_scale = take(scale, ssl)
            assert torch.equal(fp8.dequantize(take(q, sl), rank_scale, granularity, block), take(deq, sl))
            if granularity == "tensor":
                assert ssl.dim is None
            elif granularity == "channel" and sl.dim == len(shape) - 1:
                assert ssl.dim is None                      # a row split keeps whole-row scales


def _raises(exc, name, fn, *args, **kw):
    with pytest.raises(exc) as e:
        fn(*args, **kw)
    assert name in str(e.value), str(e.value)
    return str(e.value)


def test_errors_are_typed_and_name_the_tensor():
    o = L + "self_attn.o_proj.weight"
    for tp_size in (0, -1, True, 1.5, "2"):
        _raises(OptionsError, o, shard_of, o, (64, 64), 0, tp_size)
    for tp_rank in (-1, 4, 1.0, None):
        _raises(OptionsError, o, shard_of, o, (64, 64), tp_rank, 4)
    msg = _raises(TPError, o, shard_of, o, (64, 100), 0, 3)
    assert "[64, 100]" in msg and "dim 1" in msg and "tp_size=3" in msg and "replicate" in msg
    qkv = L + "self_attn.qkv_proj.weight"
    _raises(TPError, qkv, shard_of, qkv, (64 + 48, 64), 0, 2, heads=Heads(4, 3, 16))       # 3 kv heads / 2
    _raises(TPError, qkv, shard_of, qkv, (64 + 48, 64), 0, 4, heads=Heads(4, 3, 16))       # 4 % 3 kv replicas
    _raises(TPError, qkv, shard_of, qkv, (6 * 16, 64), 0, 8, heads=Heads(4, 1, 16))        # 4 q heads / 8
    _raises(TPError, qkv, shard_of, qkv, (96, 64), 0, 2)                                    # no heads
    _raises(TPError, qkv, shard_of, qkv, (100, 64), 0, 2, heads=Heads(4, 1, 16))            # parts != 96
    gu = L + "mlp.gate_up_proj.weight"
    _raises(TPError, gu, shard_of, gu, (7, 64), 0, 1)
    _raises(TPError, gu, shard_of, gu, (12, 64), 0, 4)                                      # 6 per part / 4
    up = L + "mlp.up_proj.weight"
    _raises(OptionsError, up, shard_of, up, (12, 64), 0, 2, fused=(6, 0, 6))
    k = L + "self_attn.k_proj.weight"
    _raises(TPError, k, shard_of, k, (40, 64), 0, 2, heads=Heads(8, 3, 16))                 # 40 != 3 heads
    # block scales: a shard boundary inside a 128-row block
    _raises(TPError, up, shard_of, up, (384, 128), 0, 2, block=(128, 128))
    _raises(TPError, o, shard_of, o, (128, 384), 1, 2, block=(128, 128))
    _raises(TPError, qkv, shard_of, qkv, (12 * 64, 128), 4, 8, heads=Heads(8, 2, 64), block=(128, 128))
    assert shard_of(up, (384, 128), 1, 3, block=(128, 128)).ranges == ((128, 256),)
    _raises(OptionsError, up, shard_of, up, (384, 128), 0, 3, block=(0, 128))
    sl = shard_of(up, (256, 128), 1, 2)
    _raises(TPError, up, scale_slice, sl, (3, 1))                                           # no grid of it
    _raises(TPError, up, scale_slice, sl, (2, 1, 1))
    _raises(TPError, up, byte_ranges, 0, (256, 64), 2, sl)
    _raises(OptionsError, up, byte_ranges, 0, (256, 128), 0, sl)
    _raises(TPError, up, take, torch.zeros(4, 4), sl)
    _raises(TPError, up, scale_slice, shard_of(up, (384, 128), 1, 3), (3, 1), block=(100, 128))


def test_bad_plans_and_heads_are_option_errors():
    for plan in ([("a", "column")], {"a": "columns"}, {"": "row"}, {3: "row"}, {"re:(": "row"}):
        with pytest.raises(OptionsError):
            tp_plan(plan)
    for args in ((0, 1, 8), (8, 1, -1), (8, True, 8), (8, 2, 8, 0)):
        with pytest.raises(OptionsError):
            Heads(*args)
    assert tp_plan(None).style("x.weight") is None


@settings(max_examples=300, deadline=None)
@given(tp=st.integers(1, 8), per=st.lists(st.integers(1, 3), min_size=1, max_size=3),
       other=st.integers(1, 5), experts=st.integers(0, 3), row=st.booleans(), itemsize=st.sampled_from([1, 2, 4]),
       data=st.data())
def test_property_ranks_partition_every_part(tp, per, other, experts, row, itemsize, data):
    """Any shape tp divides, any parts: the ranks' ranges tile each part in rank order, shapes
    agree, and the byte ranges read the rank's tensor out of the file bytes."""
    parts = tuple(p * tp for p in per)
    size = sum(parts)
    mat = (other, size) if row else (size, other)
    shape = ((experts,) if experts else ()) + mat
    name = "m.x.o_proj.weight" if row else "m.x.up_proj.weight"
    fused = None if row else parts
    t = torch.arange(torch.Size(shape).numel(), dtype=torch.int32).reshape(shape)
    t = t.to({1: torch.uint8, 2: torch.int16, 4: torch.int32}[itemsize])
    start = data.draw(st.integers(0, 64))
    buf = bytes(start) + raw(t)
    slices = [shard_of(name, shape, r, tp, fused=fused) for r in range(tp)]
    dim = len(shape) - 1 if row else len(shape) - 2
    off = 0
    for i, p in enumerate(parts if fused else (size,)):
        spans = [s.ranges[i] for s in slices]
        assert spans[0][0] == off and spans[-1][1] == off + p
        assert all(a[1] == b[0] and a[1] - a[0] == p // tp for a, b in zip(spans, spans[1:] + [(off + p, 0)]))
        off += p
    for sl in slices:
        assert sl.dim == dim and sl.shape == shape[:dim] + (size // tp,) + shape[dim + 1:]
        ranges = byte_ranges(start, shape, itemsize, sl)
        assert read(buf, ranges) == raw(take(t, sl))
        assert all(a[1] < b[0] for a, b in zip(ranges, ranges[1:]))             # sorted, merged
        runs = strided_ranges(start, shape, itemsize, sl)
        assert sum(r.length * r.count for r in runs) == sum(hi - lo for lo, hi in ranges)


def test_gpt_oss_experts_in_out_are_cut_as_vllm_narrows_them():
    # gpt-oss: gate_up_proj [E, H, 2I] with gate / up interleaved on the last dim, down_proj [E, I, H];
    # vLLM's gpt_oss.py: gate_up[:, :, 2 * s:2 * e], its bias [:, 2 * s:2 * e], down[:, s:e, :]
    E, H, I, tp = 3, 16, 24, 4
    per = I // tp
    for r in range(tp):
        s, e = r * per, (r + 1) * per
        gu = full((E, H, 2 * I))
        sl = shard_of("model.layers.0.mlp.experts.gate_up_proj", gu.shape, r, tp, in_out=True)
        assert torch.equal(take(gu, sl), gu[:, :, 2 * s:2 * e])
        b = full((E, 2 * I))
        sl = shard_of("model.layers.0.mlp.experts.gate_up_proj_bias", b.shape, r, tp, in_out=True)
        assert torch.equal(take(b, sl), b[:, 2 * s:2 * e])
        d = full((E, I, H))
        sl = shard_of("model.layers.0.mlp.experts.down_proj", d.shape, r, tp, in_out=True)
        assert torch.equal(take(d, sl), d[:, s:e, :])
        db = full((E, H))
        assert shard_of("model.layers.0.mlp.experts.down_proj_bias", db.shape, r, tp, in_out=True).dim is None
        # without in_out the [out, in] rule would cut gate_up's hidden dim: not what gpt-oss needs
        assert shard_of("model.layers.0.mlp.experts.gate_up_proj", gu.shape, r, tp).dim == 1


def test_a_vocabulary_vllm_pads_is_refused_unless_the_plan_says_how():
    # vLLM cuts round_up(V, 64) rows in equal parts: for V % 64 != 0 its parts are not V / tp rows each
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        with pytest.raises(TPError, match="pads a vocabulary to a multiple of 64.*32064.*replicate"):
            shard_of(name, (32002, 64), 0, 2)
        assert shard_of(name, (32002, 64), 1, 2, plan={name.rpartition(".")[0]: "column"}).ranges == ((16001, 32002),)
        assert shard_of(name, (32002, 64), 0, 2, plan={name.rpartition(".")[0]: "replicate"}).dim is None
        assert shard_of(name, (32000, 64), 1, 2).ranges == ((16000, 32000),)   # a multiple of 64: vLLM's parts
        assert shard_of(name, (32002, 64), 0, 1).dim is not None                # tp_size 1: nothing to cut


def test_other_architectures_layer_names_and_gpt_oss_sinks():
    # vLLM: OPT / BART / CLIP / Whisper fc1 column, fc2 and out_proj row; DeepSeek MLA q_b / kv_b column
    # (q_a / kv_a replicated); GPT-NeoX dense_h_to_4h column, dense_4h_to_h row; gpt-oss sinks by heads
    t = full((8, 16))
    for leaf, dim in (("fc1", 0), ("q_b_proj", 0), ("kv_b_proj", 0), ("dense_h_to_4h", 0), ("fc2", 1),
                      ("out_proj", 1), ("dense_4h_to_h", 1), ("q_a_proj", None), ("kv_a_proj_with_mqa", None)):
        sl = shard_of(f"model.layers.0.x.{leaf}.weight", t.shape, 1, 2)
        assert sl.dim == dim, leaf
        if dim is not None:
            assert torch.equal(take(t, sl), torch.chunk(t, 2, dim)[1]), leaf
    sinks = full((8,))
    sl = shard_of("model.layers.0.self_attn.sinks", sinks.shape, 3, 4, in_out=True)
    assert torch.equal(take(sinks, sl), sinks[6:8])
    assert shard_of("model.layers.0.self_attn.sinks", sinks.shape, 3, 4).dim is None   # not gpt-oss: whole


def test_an_indivisible_tensor_suggests_a_pattern_for_every_layer():
    import re
    with pytest.raises(TPError) as e:
        shard_of("model.layers.3.mlp.up_proj.weight", (6, 64), 0, 4)
    pattern = re.search(r"tp_plan=\{'re:(.*)': 'replicate'\}", str(e.value)).group(1).replace("\\\\", "\\")
    assert re.match(pattern, "model.layers.17.mlp.up_proj") and not re.match(pattern, "model.layers.17.mlp.up_proj2")
