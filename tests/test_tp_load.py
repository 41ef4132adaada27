"""Tensor-parallel loads over torch.distributed (gloo, spawned ranks on 127.0.0.1): each rank's
tensors are exactly its slice of the TP=1 result, data and scales, bit for bit, and it reads only
its own bytes. Slices are recomputed here from tp.shard_of (the layout tested in test_tp.py)."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch
from safetensors.torch import save_file

from mmapload import stream_quantize
from mmapload.errors import OptionsError, TPError
from mmapload.result import QuantizedTensor
from mmapload.tp import Heads, shard_of
from mmapload.tp_ranges import scale_slice, take
from tpworld import run_world

HEADS = Heads(8, 2, 16)           # 8 q heads, 2 kv heads of 16: at TP=4 each kv head serves 2 ranks
TP_PLAN = {"model.extra": "row"}  # a name the default rule replicates, cut by the tp_plan option
L0, L1 = "model.layers.0.", "model.layers.1."
SHAPES = {
    "model.embed_tokens.weight": (256, 64),                  # kept, column (vocab rows)
    L0 + "input_layernorm.weight": (64,),                    # replicated
    L0 + "self_attn.q_proj.weight": (128, 64),
    L0 + "self_attn.q_proj.bias": (128,),                    # kept 1-D, cut with its weight
    L0 + "self_attn.k_proj.weight": (32, 64),                # kv heads replicated at TP=4
    L0 + "self_attn.v_proj.weight": (32, 64),
    L0 + "self_attn.o_proj.weight": (64, 128),               # row
    L0 + "self_attn.o_proj.bias": (64,),                     # replicated
    L0 + "self_attn.qkv_proj.weight": (192, 64),             # fused, per part (q, k, v)
    L0 + "mlp.gate_up_proj.weight": (256, 64),               # fused halves
    L0 + "mlp.down_proj.weight": (64, 128),
    L0 + "mlp.experts.gate_up_proj": (2, 256, 64),           # fused experts, column per half
    L0 + "mlp.experts.down_proj": (2, 64, 128),              # fused experts, row
    L1 + "mlp.up_proj.weight": (512, 256),                   # 256 KiB: pieces share scales (groups)
    L1 + "mlp.down_proj.weight": (4, 40960),                 # 80 KiB rows: a row is cut into pieces
    L1 + "self_attn.o_proj.weight": (64, 128),               # skipped: a kept row-parallel slice
    "model.extra.weight": (3, 20000),                        # kept, tp_plan row: rows over a slot
    "model.norm.weight": (64,),
    "lm_head.weight": (256, 64),                             # kept (name rule), column
}
KV = 4 * 32 * 64 * 2              # bytes of the kv parts: k_proj, v_proj and qkv_proj's k and v
SKIP = [L1 + "self_attn.o_proj.weight", "model.extra.weight"]
RING = 64 << 10   # 16 KiB slots: most tensors come in several pieces


def make_checkpoint(folder, shapes=SHAPES, seed=0):
    g = torch.Generator().manual_seed(seed)
    tensors = {n: (torch.randn(s, generator=g) * (0.5 + i % 3)).to(torch.bfloat16) for i, (n, s) in
               enumerate(shapes.items())}
    half = len(tensors) // 2
    names = list(tensors)
    save_file({n: tensors[n] for n in names[:half]}, folder / "model-00001-of-00002.safetensors")
    save_file({n: tensors[n] for n in names[half:]}, folder / "model-00002-of-00002.safetensors")
    index = {"metadata": {}, "weight_map": {n: f"model-0000{1 + (i >= half)}-of-00002.safetensors"
                                            for i, n in enumerate(names)}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    (folder / "config.json").write_text(json.dumps({"num_attention_heads": 8, "num_key_value_heads": 2,
                                                    "head_dim": 16, "hidden_size": 64}))
    return folder


CASES = [dict(granularity=g, fp8_dtype=d, io=io) for g, d, io in itertools.product(
    ("tensor", "channel", "block"), ("e4m3", "e5m2"), ("mmap", "pread", "direct"))] + [
    dict(granularity=g, fp8_dtype="e4m3", io="mmap", scale_dtype="weight") for g in ("tensor", "channel", "block")]
OPTS = dict(policy="names", skip=SKIP, tp_plan=TP_PLAN, ring_bytes=RING, block_size=(16, 16), tp_timeout=60)


def _as_saved(model):
    out = {}
    for name, t in model.items():
        out[name] = (t.data, t.scale) if isinstance(t, QuantizedTensor) else t
    return out, model.report.as_dict()


def _load_cases(rank, world, folder, cases):
    return [_as_saved(stream_quantize(folder, "cpu", tp_size=world, **OPTS, **case)) for case in cases]


def _heads(name):
    leaf = name.split(".")[-2] if "." in name else ""
    return HEADS if leaf in ("q_proj", "k_proj", "v_proj", "qkv_proj") else None


def _slice(name, shape, rank, world, block):
    return shard_of(name, shape, rank, world, plan=TP_PLAN, heads=_heads(name), block=block)


def _check_world(folder, world, results, cases):
    """Per case: every rank's tensors == its slice of the TP=1 load; every index of every tensor
    held by some rank; bytes read == the rank's slices' bytes."""
    for k, case in enumerate(cases):
        full = stream_quantize(folder, "cpu", **{**OPTS, "tp_plan": None}, **case)
        covered = {}
        for rank in range(world):
            tensors, report = results[rank][1][k]
            assert report["tp_rank"] == rank and report["tp_size"] == world
            assert set(tensors) == set(full), case
            want_bytes = 0
            for name, ref in full.items():
                q = isinstance(ref, QuantizedTensor)
                block = (16, 16) if q and case["granularity"] == "block" else None
                sl = _slice(name, tuple(ref.shape), rank, world, block)
                got = tensors[name]
                if q:
                    data, scale = got
                    assert torch.equal(data.view(torch.uint8), take(ref.data, sl).view(torch.uint8)), (case, name)
                    ssl = scale_slice(sl, tuple(ref.scale.shape), block=block)
                    assert torch.equal(scale, take(ref.scale, ssl)), (case, name)
                else:
                    assert torch.equal(got, take(ref, sl)), (case, name)
                want_bytes += math.prod(sl.shape) * 2
                if sl.dim is not None:
                    covered.setdefault(name, set()).update(i for lo, hi in sl.ranges for i in range(lo, hi))
            assert report["bytes_read"] == want_bytes, (case, rank)
        for name, idx in covered.items():   # the ranks' slices together hold all of every tensor
            sl = _slice(name, tuple(full[name].shape), 0, world, None)
            assert idx == set(range(sl.full_shape[sl.dim])), name
    return full


@pytest.mark.timeout(600)
@pytest.mark.parametrize("world", [2, 4])
def test_ranks_hold_their_slice_of_the_tp1_result_bit_for_bit(tmp_path, world):
    (tmp_path / "ckpt").mkdir()
    folder = make_checkpoint(tmp_path / "ckpt")
    results = run_world(_load_cases, world, tmp_path, folder, CASES)
    for r in results:
        assert r[0] == "ok", r
    full = _check_world(folder, world, results, CASES)
    # the share: sharded tensors read 1/world of their bytes, replicated ones all of theirs
    total = sum(t.numel() * 2 for t in (v.data if isinstance(v, QuantizedTensor) else v for v in full.values()))
    rep = sum(math.prod(s) * 2 for n, s in SHAPES.items()
              if _slice(n, s, 0, world, None).dim is None)
    for r in results:
        for tensors, report in r[1]:   # kv heads (k, v, qkv's k and v) are shared by world / 2 ranks
            assert report["bytes_read"] <= (total - rep - KV) / world + rep + KV / min(world, 2)
            assert report["collectives"] >= 2    # the plan check and the end-of-load check


def test_tp_size_without_a_process_group_is_an_options_error(tmp_path):
    (tmp_path / "c").mkdir()
    folder = make_checkpoint(tmp_path / "c")
    with pytest.raises(OptionsError, match="init_process_group"):
        stream_quantize(folder, tp_size=2, policy="names")


def test_convert_and_load_into_refuse_tp(tmp_path):
    from mmapload import convert
    from mmapload.nn import load_into
    (tmp_path / "c").mkdir()
    folder = make_checkpoint(tmp_path / "c")
    with pytest.raises(OptionsError, match="tp_size=2"):
        convert(folder, tmp_path / "out", tp_size=2)
    with pytest.raises(OptionsError, match="tp_size=2"):
        load_into(torch.nn.Linear(4, 4, device="meta"), folder, tp_size=2)
    assert not (tmp_path / "out").exists()


def _load_one(rank, world, folder, opts):
    return _as_saved(stream_quantize(folder, "cpu", tp_size=world, **opts))


@pytest.mark.timeout(300)
def test_a_dimension_tp_size_does_not_divide_is_a_tp_error_naming_tensor_and_fix(tmp_path):
    (tmp_path / "c").mkdir()
    folder = make_checkpoint(tmp_path / "c", {"model.layers.0.mlp.up_proj.weight": (6, 64),
                                              "model.norm.weight": (64,)})
    results = run_world(_load_one, 4, tmp_path, folder, dict(policy="names", tp_timeout=20))
    for r in results:
        assert r[:2] == ("error", "TPError"), r
        assert "model.layers.0.mlp.up_proj.weight" in r[2] and "tp_size=4" in r[2] and "replicate" in r[2]


@pytest.mark.timeout(300)
def test_a_cut_off_the_block_grid_is_a_tp_error(tmp_path):
    (tmp_path / "c").mkdir()
    folder = make_checkpoint(tmp_path / "c", {"model.layers.0.mlp.down_proj.weight": (64, 96),
                                              "model.norm.weight": (64,)})
    results = run_world(_load_one, 2, tmp_path, folder,
                        dict(policy="names", granularity="block", block_size=(32, 32), tp_timeout=20))
    for r in results:
        assert r[:2] == ("error", "TPError"), r
        assert "down_proj" in r[2] and "block grid" in r[2] and "granularity='channel'" in r[2]


def _load_mismatched(rank, world, folder):
    return _as_saved(stream_quantize(folder, "cpu", tp_size=world, policy="names", tp_timeout=20,
                                     ring_bytes=RING if rank else 2 * RING))


@pytest.mark.timeout(300)
def test_ranks_with_different_options_fail_with_a_tp_error_before_reading(tmp_path):
    (tmp_path / "c").mkdir()
    folder = make_checkpoint(tmp_path / "c")
    results = run_world(_load_mismatched, 2, tmp_path, folder)
    for r in results:
        assert r[:2] == ("error", "TPError") and "planned different loads" in r[2], r


def _load_and_die(rank, world, folder, how):
    from mmapload import assemble
    flush, calls = assemble.Assembler.flush, []

    def dying_flush(self):
        calls.append(1)
        if rank == 1 and len(calls) == 3:   # mid-load, after some collectives
            if how == "exit":
                import os
                os._exit(7)
            import time
            time.sleep(30)                  # alive but stalled
        return flush(self)
    assemble.Assembler.flush = dying_flush
    return _as_saved(stream_quantize(folder, "cpu", tp_size=world, policy="names", ring_bytes=RING,
                                     tp_timeout=5))


@pytest.mark.timeout(300)
@pytest.mark.parametrize("how", ["exit", "stall"])
def test_a_rank_that_dies_or_stalls_mid_load_makes_the_others_raise(tmp_path, how):
    import time
    (tmp_path / "c").mkdir()
    folder = make_checkpoint(tmp_path / "c")
    t0 = time.monotonic()
    results = run_world(_load_and_die, 2, tmp_path, folder, how, deadline=120)
    assert results[0][:2] == ("error", "TPError"), results[0]
    assert "rank 0 of tp_size=2" in results[0][2]
    # the stalled rank wakes to a group whose peer gave up: its next collective fails too
    assert results[1][0] == "died" if how == "exit" else results[1][:2] == ("error", "TPError"), results[1]
    assert time.monotonic() - t0 < 100


ARCHS = ("llama", "mixtral", "qwen3_moe", "gpt_oss", "gpt2")


def _load_archs(rank, world, folders):
    return [_as_saved(stream_quantize(f, "cpu", tp_size=world, granularity="channel", tp_timeout=60))
            for f in folders]


@pytest.mark.timeout(600)
def test_real_architectures_ranks_hold_vllms_slices(tmp_path):
    """transformers' own tiny models: vLLM's layout per architecture (heads from config.json; gpt-oss's
    [experts, in, out] experts with gate / up interleaved), bit-identical to the TP=1 load's slices."""
    import archs
    folders = [archs.build(kind, tmp_path / kind) for kind in ARCHS]
    results = run_world(_load_archs, 2, tmp_path, folders)
    for r in results:
        assert r[0] == "ok", r
    sharded = {}
    for k, (kind, folder) in enumerate(zip(ARCHS, folders)):
        cfg = json.loads((folder / "config.json").read_text())
        heads = Heads(cfg["num_attention_heads"], cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
                      cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]) \
            if "num_attention_heads" in cfg else None
        full = stream_quantize(folder, "cpu", granularity="channel")
        for rank in range(2):
            tensors, report = results[rank][1][k]
            for name, ref in full.items():
                leaf = name.split(".")[-2] if "." in name else ""
                sl = shard_of(name, tuple(ref.shape), rank, 2, in_out=kind == "gpt_oss",
                              heads=heads if leaf in ("q_proj", "k_proj", "v_proj") else None)
                if isinstance(ref, QuantizedTensor):
                    data, scale = tensors[name]
                    assert torch.equal(data.view(torch.uint8), take(ref.data, sl).view(torch.uint8)), (kind, name)
                    assert torch.equal(scale, take(ref.scale, scale_slice(sl, tuple(ref.scale.shape)))), (kind, name)
                else:
                    assert torch.equal(tensors[name], take(ref, sl)), (kind, name)
                sharded[kind] = sharded.get(kind, 0) + (sl.dim is not None)
            assert report["bytes_read"] < full.report.bytes_read or kind == "gpt2", kind
    assert sharded["gpt2"] == 0 and all(sharded[k] > 0 for k in ARCHS if k != "gpt2")


def _load_fp8_sources(rank, world, folders):
    return [_as_saved(stream_quantize(f, "cpu", tp_size=world, policy="names", tp_timeout=60)) for f in folders]


@pytest.mark.timeout(600)
@pytest.mark.filterwarnings("ignore::mmapload.errors.MmapLoadWarning")   # convert keeps fused experts
def test_fp8_checkpoints_weights_and_their_scales_are_cut_alike(tmp_path):
    """An FP8 source (convert's outputs: per-tensor, per-channel, block scales): each rank's FP8
    weight and scale are the slices of the TP=1 load's, the block grid cut with the weight."""
    from mmapload import convert
    (tmp_path / "c").mkdir()
    src = make_checkpoint(tmp_path / "c", {k: v for k, v in SHAPES.items() if k not in SKIP})
    folders = [convert(src, tmp_path / f"{fmt}-{g}", format=fmt, granularity=g, block_size=(16, 16), policy="names")
               for fmt, g in (("compressed-tensors", "tensor"), ("compressed-tensors", "channel"), ("fp8", "block"))]
    results = run_world(_load_fp8_sources, 2, tmp_path, folders)
    for r in results:
        assert r[0] == "ok", r
    for k, folder in enumerate(folders):
        full = stream_quantize(folder, "cpu", policy="names")
        cut = 0
        for rank in range(2):
            tensors, _ = results[rank][1][k]
            assert set(tensors) == set(full)
            for name, ref in full.items():
                if not isinstance(ref, QuantizedTensor):
                    continue
                block = ref.block_size if ref.granularity.value == "block" else None
                sl = _slice(name, tuple(ref.shape), rank, 2, block)
                data, scale = tensors[name]
                assert torch.equal(data.view(torch.uint8), take(ref.data, sl).view(torch.uint8)), (folder, name)
                assert torch.equal(scale, take(ref.scale, scale_slice(sl, tuple(ref.scale.shape), block=block)))
                cut += sl.dim is not None
        assert cut > 10, folder


def _measured_load(rank, world, folder, ring):
    import threading
    import time
    from mmapload._procmem import read_mem
    base, peak, stop = read_mem(), {"rss": 0, "file": 0}, threading.Event()

    def sample():
        while not stop.is_set():
            m = read_mem()
            peak["rss"], peak["file"] = max(peak["rss"], m.rss), max(peak["file"], m.file or 0)
            time.sleep(0.002)
    t = threading.Thread(target=sample, daemon=True)
    t.start()
    model = stream_quantize(folder, "cpu", tp_size=world, ring_bytes=ring, tp_timeout=120)
    stop.set()
    t.join()
    with open("/proc/self/status") as f:
        hwm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    return {"over": max(hwm, peak["rss"]) - base.rss - model.nbytes, "file_over": peak["file"] - (base.file or 0),
            "bytes_read": model.report.bytes_read, "retained": model.nbytes}


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_host_peak_per_rank_is_bounded_by_the_ring(gib_checkpoint, tmp_path):
    """The TP=1 memory contract (test_memory.py) holds on every rank, fresh processes, 1.1 GiB."""
    ring, mib = 64 << 20, 2**20
    size = sum(p.stat().st_size for p in gib_checkpoint.glob("*.safetensors"))
    results = run_world(_measured_load, 2, tmp_path, gib_checkpoint, ring)
    for r in results:
        assert r[0] == "ok", r
        m = r[1]
        print(f"rank: over {m['over'] / mib:.0f} MiB, file {m['file_over'] / mib:.0f} MiB, "
              f"read {m['bytes_read'] / mib:.0f} of {size / mib:.0f} MiB, retained {m['retained'] / mib:.0f} MiB")
        assert m["over"] <= ring + 200 * mib and m["file_over"] <= ring + 64 * mib, m
        assert m["bytes_read"] < 0.6 * size, m


def _retry_after_failures(rank, world, folder, bad):
    """Rank 1 reads a copy with a NaN (every rank raises NonFiniteError after the same collective:
    the group stays usable); then rank 1 closes an iter_quantized early (the group is left out of
    step: the next load there is a TPError at once, on that rank, never a gloo abort)."""
    import warnings
    from mmapload import iter_quantized
    from mmapload.errors import NonFiniteError
    out = []
    try:
        stream_quantize(bad if rank else folder, "cpu", tp_size=world, policy="names", ring_bytes=RING, tp_timeout=20)
    except NonFiniteError as e:
        out.append(("nonfinite", "in rank 1's part" in str(e)))
    out.append(len(stream_quantize(folder, "cpu", tp_size=world, policy="names", tp_timeout=20)))   # retry works
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        stream_quantize(folder, "cpu", tp_size=world, policy="names", tp_timeout=20, tp_plan={"model.layers.0.mlp.up_prj": "row"})
    out.append([str(x.message) for x in w if "matches no tensor" in str(x.message)])
    if rank == 1:
        it = iter_quantized(folder, "cpu", tp_size=world, policy="names", ring_bytes=RING, tp_timeout=5)
        next(it)
        it.close()
    else:
        try:
            stream_quantize(folder, "cpu", tp_size=world, policy="names", ring_bytes=RING, tp_timeout=5)
        except TPError as e:
            out.append(("peer left", "left after" in str(e) or "stalled" in str(e)))
    try:
        stream_quantize(folder, "cpu", tp_size=world, policy="names", tp_timeout=5)
    except TPError as e:
        out.append(("refused", "destroy_process_group" in str(e)))
    return out


@pytest.mark.timeout(300)
def test_a_group_stays_usable_after_an_in_step_failure_and_refuses_after_an_early_close(tmp_path):
    from safetensors.torch import load_file
    (tmp_path / "c").mkdir()
    (tmp_path / "bad").mkdir()
    folder = make_checkpoint(tmp_path / "c")
    for f in folder.iterdir():
        (tmp_path / "bad" / f.name).write_bytes(f.read_bytes())
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shard = tmp_path / "bad" / index["weight_map"][L0 + "self_attn.o_proj.weight"]
    t = load_file(shard)
    t[L0 + "self_attn.o_proj.weight"][5, 100] = float("nan")   # rank 1's half of the row-parallel weight
    save_file(t, shard)
    r0, r1 = run_world(_retry_after_failures, 2, tmp_path, folder, tmp_path / "bad", deadline=200)
    assert r0[0] == r1[0] == "ok", (r0, r1)
    assert r0[1][0] == r1[1][0] == ("nonfinite", True)
    assert r0[1][1] == r1[1][1] == len(SHAPES)
    assert all(len(r[1][2]) == 1 and "up_prj" in r[1][2][0] for r in (r0, r1))
    assert r0[1][3] == ("peer left", True)
    assert r0[1][-1] == r1[1][-1] == ("refused", True)


@pytest.mark.timeout(300)
def test_attention_without_head_geometry_is_a_tp_error(tmp_path):
    (tmp_path / "c").mkdir()
    folder = make_checkpoint(tmp_path / "c")
    (folder / "config.json").unlink()
    results = run_world(_load_one, 2, tmp_path, folder, dict(policy="names", tp_timeout=20))
    for r in results:
        assert r[:2] == ("error", "TPError") and "no head geometry" in r[2] and "config.json" in r[2], r
