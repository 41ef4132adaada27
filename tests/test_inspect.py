"""mmapload.estimate.estimate and ``python -m mmapload inspect``: totals and projected memory."""

import json
import os
import struct
import time

import pytest
import torch

from mmapload import stream_quantize
from mmapload.errors import DeviceError, OptionsError
from mmapload.config import LoadOptions
from mmapload.decide import policy_for
from mmapload.estimate import CUDA_CONTEXT, DEVICE_MARGIN, HOST_MARGIN, estimate
from mmapload.synth import make_llama_checkpoint

MiB = 2**20
RING = 256 << 10          # 64 KiB slots: the 320 KiB mlp matrices are cut into 5 pieces


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """h=256 llama: 128 KiB attention and 320 KiB mlp matrices, 2 MiB embeddings."""
    return make_llama_checkpoint(tmp_path_factory.mktemp("insp"), 24 * MiB, shards=3)


def test_totals_come_from_the_headers(ckpt):
    from mmapload.checkpoint import open_checkpoint
    c = open_checkpoint(ckpt)
    p = estimate(ckpt, "cpu", ring_bytes=RING, top=4)
    assert p.tensors == len(c.tensors) and p.total_bytes == c.total_bytes
    assert [f for f, _, _ in p.shards] == [s.path.name for s in c.shards]
    assert sum(n for _, n, _ in p.shards) == p.tensors and sum(b for _, _, b in p.shards) == p.total_bytes
    assert p.dtypes == {"BF16": (p.tensors, p.total_bytes)}
    assert [s.nbytes for s in p.largest] == sorted((s.nbytes for s in c.tensors), reverse=True)[:4]
    opts = LoadOptions(ring_bytes=RING)
    q = [s for s in c.tensors if policy_for(c, opts)(s)]
    assert p.quantized.count == len(q) and p.quantized.nbytes == sum(s.nbytes for s in q)
    assert p.quantized.names == tuple(s.name for s in q[:3])
    assert p.kept.count + p.quantized.count == p.tensors
    assert p.kept.nbytes + p.quantized.nbytes == p.total_bytes
    assert "model.embed_tokens.weight" in p.kept.names
    assert p.fp8_bytes == sum(s.numel for s in q) and p.scale_bytes == 4 * len(q)


@pytest.mark.parametrize("scale_dtype", ["float32", "weight"])
@pytest.mark.parametrize("granularity", ["tensor", "channel", "block"])
def test_projected_retained_bytes_are_exact(ckpt, granularity, scale_dtype):
    model = stream_quantize(ckpt, "cpu", ring_bytes=MiB, granularity=granularity,  # block: 128 rows
                            scale_dtype=scale_dtype)
    p = estimate(ckpt, "cpu", ring_bytes=MiB, granularity=granularity, scale_dtype=scale_dtype)
    assert p.retained_bytes == model.nbytes == model.report.retained_bytes
    scales = [t.scale for t in model.values() if hasattr(t, "scale")]
    assert p.scale_bytes == sum(s.nbytes for s in scales)
    assert {s.dtype for s in scales} == {torch.bfloat16 if scale_dtype == "weight" else torch.float32}
    assert p.kept.count + p.quantized.count == model.report.tensors
    assert p.quantized.count == model.report.quantized


def test_cpu_and_cuda_models(ckpt):
    cpu = estimate(ckpt, "cpu", ring_bytes=RING)
    slot = cpu.options.slot_bytes
    assert slot == 64 << 10 and cpu.ring_bytes == RING
    assert cpu.prepass > 0                 # mlp matrices span 5 batches of a 4-slot ring
    assert cpu.device_peak is None and cpu.needed() == cpu.host_peak
    assert cpu.host_terms["ring"] == RING and cpu.host_terms["retained"] == cpu.retained_bytes
    assert cpu.host_terms["margin"] == HOST_MARGIN
    assert cpu.host_peak >= cpu.retained_bytes + cpu.ring_bytes + 2 * slot + HOST_MARGIN

    cuda = estimate(ckpt, "cuda:0", ring_bytes=RING)   # no GPU needed to project
    assert cuda.prepass == 0
    biggest_cut = max(s.nbytes for s in cuda.largest if "mlp" in s.name)
    assert cuda.hold_bytes == biggest_cut       # the largest per-tensor matrix cut into pieces
    d = cuda.device_terms
    assert d["staging"] == 2 * cuda.stage_bytes and cuda.stage_bytes <= slot
    assert d["retained"] >= cuda.retained_bytes
    assert d["quantizer scratch"] == 16 * MiB
    assert cuda.device_peak == sum(d.values()) >= cuda.retained_bytes + cuda.hold_bytes
    assert "retained" not in cuda.host_terms and cuda.host_terms["ring (pinned)"] == RING
    assert cuda.needed() == cuda.device_peak + CUDA_CONTEXT + DEVICE_MARGIN
    assert cuda.fits(cuda.needed()) and not cuda.fits(cuda.needed() - 1)
    # channel scales need no pre-pass and no hold buffer; the ring rounds up when pinned
    ch = estimate(ckpt, "cuda", ring_bytes=320 << 10, granularity="channel")
    assert ch.hold_bytes == 0 and ch.host_terms["ring (pinned)"] == 512 << 10
    assert ch.scale_bytes == 4 * sum(s.numel // s.shape[-1] for s in _quantized(ckpt))


def _quantized(ckpt):
    from mmapload.checkpoint import open_checkpoint
    c = open_checkpoint(ckpt)
    return [s for s in c.tensors if policy_for(c, LoadOptions())(s)]


def test_io_mode_changes_the_reader_term(ckpt):
    mm = estimate(ckpt, "cpu", ring_bytes=RING, io="mmap")
    pr = estimate(ckpt, "cpu", ring_bytes=RING, io="pread")
    di = estimate(ckpt, "cpu", ring_bytes=RING, io="direct")
    assert mm.host_terms["reader (mmap)"] == 2 * 64 << 10 and pr.host_terms["reader (pread)"] == 0
    assert di.host_terms["reader (direct)"] >= 3 * 64 << 10      # a bounce buffer per shard


def test_bad_input_raises_typed_errors(ckpt, tmp_path):
    with pytest.raises(DeviceError):
        estimate(ckpt, "tpu")
    with pytest.raises(OptionsError):
        estimate(ckpt, "cpu", ring_bytes=1)
    with pytest.raises(OptionsError):
        estimate(ckpt, "cpu", ring_size=1)
    with pytest.raises(FileNotFoundError):
        estimate(tmp_path / "nope.safetensors")


def test_cli_answers_fits_and_does_not_fit(ckpt, capsys):
    from mmapload.cli import main

    def run(*args):
        assert main(["inspect", str(ckpt), "--ring-bytes", "256KiB", *args]) == 0
        return capsys.readouterr().out

    p = estimate(ckpt, "cuda", ring_bytes=RING)
    ok = run("--device-memory", "80GiB")
    for text in ("model-00001-of-00003.safetensors", "BF16", "largest", "quantized", "kept",
                 "model.embed_tokens.weight", "host peak", "device peak", "fits"):
        assert text in ok, text
    assert "does NOT fit" not in ok
    assert "does NOT fit" in run("--device-memory", str(p.needed() - 1))
    d = json.loads(run("--device", "cpu", "--device-memory", "1GiB", "--json"))
    cpu = estimate(ckpt, "cpu", ring_bytes=RING)
    assert d["host_peak"] == cpu.host_peak and d["retained_bytes"] == cpu.retained_bytes
    assert d["device_peak"] is None and d["fits"] is True and d["prepass"] == cpu.prepass
    assert main(["inspect", str(ckpt.parent / "missing")]) == 2
    assert "missing" in capsys.readouterr().err


def _sparse_checkpoint(path, n=40, rows=32768, cols=40960):
    """n bf16 [rows, cols] tensors (2.5 GiB each, ~100 GiB) in a sparse file: a header, no data."""
    header, off = {}, 0
    for i in range(n):
        nb = rows * cols * 2
        header[f"model.layers.{i}.mlp.up_proj.weight"] = {
            "dtype": "BF16", "shape": [rows, cols], "data_offsets": [off, off + nb]}
        off += nb
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + off)
    return off


def test_inspect_reads_only_headers_of_a_100_gb_checkpoint(tmp_path, capsys):
    from mmapload.cli import main
    from mmapload.bench.sampler import page_cache_bytes
    f = tmp_path / "huge.safetensors"
    total = _sparse_checkpoint(f)
    try:
        assert total >= 100 * 10**9
        t0 = time.perf_counter()
        p = estimate(f, "cuda", ring_bytes=256 * MiB, granularity="block")
        assert time.perf_counter() - t0 < 5
        assert p.total_bytes == total and p.quantized.count == 40 and p.fp8_bytes == total // 2
        assert p.hold_bytes == 0 and p.device_peak >= total // 2
        assert not p.fits(50 * 2**30) and p.fits(51 * 2**30)   # 50 GiB of FP8 + ~0.6 GiB
        if hasattr(os, "posix_fadvise"):   # nothing but the header was read
            assert page_cache_bytes([f]) <= 4 * MiB
        assert main(["inspect", str(f), "--device-memory", "50GiB"]) == 0
        assert "does NOT fit" in capsys.readouterr().out
    finally:
        f.unlink()   # sparse, but 100 GB to anything that copies /tmp


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_estimate_reads_the_plan_the_load_runs(ckpt, monkeypatch, device):
    """One plan (plan.plan_load) for the load and the estimate: the projection's staging,
    hold buffer and pre-pass count are the plan's, and the load builds the same plan."""
    import torch
    from mmapload import estimate as estimate_mod
    from mmapload import stream
    from mmapload.config import LoadConfig
    from mmapload.plan import plan_load
    made = []
    monkeypatch.setattr(estimate_mod, "plan_load", lambda *a: made.append(plan_load(*a)) or made[-1])
    p = estimate(ckpt, device, ring_bytes=RING)
    plan, = made
    assert plan.copies == (device == "cuda") and bool(plan.prepass) == (device == "cpu") and plan.held
    assert (p.stage_bytes, p.hold_bytes, p.prepass) == (plan.stage_bytes, plan.hold_bytes, len(plan.prepass))
    if device == "cpu":   # the load's own plan is the same (a CUDA load needs a GPU to prepare)
        assert stream.prepare(ckpt, device, LoadConfig(ring_bytes=RING)).plan == plan
    assert plan == plan_load(*_plan_args(ckpt, torch.device(device)))


def _plan_args(ckpt, dev):
    from mmapload.checkpoint import open_checkpoint
    c, o = open_checkpoint(ckpt), LoadOptions(ring_bytes=RING)
    return c, policy_for(c, o), o, dev
