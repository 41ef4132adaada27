"""estimate(tp_size=N): one rank's projection (its slices' bytes) against real gloo loads of
2 ranks (tests/tpworld.py): equal bytes read and retained bytes, the host peak bounded."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from mmapload import stream_quantize
from mmapload.estimate import estimate
from test_tp_load import OPTS, make_checkpoint
from tpworld import run_world

# The TP load tests' checkpoint (every kind of slice: column / row, fused parts, kv heads shared,
# kept slices, tp_plan) per granularity and io mode; then thousands of tiny tensors, where the
# pages a mmap rank faults in at its pieces' edges (with the kernel's fault-around window, other
# ranks' bytes included) would add up if the reader did not drop them from its RSS.
CASES = [("slices", dict(OPTS, granularity="tensor", io="mmap")),
         ("slices", dict(OPTS, granularity="channel", io="pread")),
         ("slices", dict(OPTS, granularity="block", io="direct")),
         ("tiny", dict(policy="names", ring_bytes=1 << 20, io="pread")),
         ("tiny", dict(policy="names", ring_bytes=1 << 20, io="mmap"))]


def _tiny(folder):
    g = torch.Generator().manual_seed(1)
    t = {}
    for i in range(1500):   # 8 KiB q_proj (column: 4 KiB a rank), a 6-byte norm between them
        t[f"model.layers.{i}.self_attn.q_proj.weight"] = torch.randn(64, 64, generator=g).bfloat16()
        t[f"model.layers.{i}.input_layernorm.weight"] = torch.randn(3, generator=g).bfloat16()
    save_file(t, folder / "model.safetensors")
    (folder / "config.json").write_text('{"num_attention_heads": 4, "num_key_value_heads": 4, "head_dim": 16}')
    return folder


def _loads(rank, world, folders, cases):
    from mmapload._procmem import read_mem
    out = []
    for which, opts in cases:
        file_before = read_mem().file
        r = stream_quantize(folders[which], "cpu", tp_size=world, **opts).report
        out.append(dict(read=r.bytes_read, retained=r.retained_bytes, host=r.peak_rss - r.rss_before,
                        file=r.peak_rss_file - file_before, rank=r.tp_rank))
    return out


@pytest.mark.timeout(600)
def test_projection_matches_a_real_two_rank_load(tmp_path):
    for sub in ("s", "t"):
        (tmp_path / sub).mkdir()
    folders = {"slices": make_checkpoint(tmp_path / "s"), "tiny": _tiny(tmp_path / "t")}
    results = run_world(_loads, 2, tmp_path, folders, CASES)
    for r in results:
        assert r[0] == "ok", r
    for rank, (_, measured) in enumerate(results):
        for (which, opts), m in zip(CASES, measured):
            p = estimate(folders[which], "cpu", tp_size=2, tp_rank=rank, **opts)
            assert m["rank"] == rank == p.tp_rank and p.tp_size == 2
            assert m["read"] == p.bytes_read and m["retained"] == p.retained_bytes, (which, opts, m)
            assert m["host"] <= p.host_peak, (which, opts, m, p.host_terms)
            one = p.tp1
            assert one.tp_size == 1 and one.bytes_read == one.total_bytes > p.bytes_read
            assert one.retained_bytes > p.retained_bytes
            # every rank has the same sizes
            other = estimate(folders[which], "cpu", tp_size=2, tp_rank=1 - rank, **opts)
            assert (other.bytes_read, other.retained_bytes, other.host_peak) == (
                p.bytes_read, p.retained_bytes, p.host_peak)
    # the tiny tensors' file (12 MiB): the mmap load's file-backed RSS stays as small as pread's, the
    # pages around its pieces' edges dropped (they once stayed mapped: all of the file, both ranks'
    # bytes). Measured after the earlier loads touched torch's code pages for the first time.
    for rank, (_, measured) in enumerate(results):
        pr, mm = measured[3:]
        assert pr["file"] <= 2 << 20 and mm["file"] <= 3 << 20, (pr, mm)


def test_cuda_projection_of_a_rank_uses_its_slices(tmp_path):
    folder = make_checkpoint(tmp_path)
    p = estimate(folder, "cuda", tp_size=2, **OPTS)
    one = p.tp1
    assert p.device_terms["retained"] >= p.retained_bytes and p.device_peak < one.device_peak
    assert p.device_terms["retained"] < one.device_terms["retained"]
    assert p.hold_bytes <= one.hold_bytes and p.needed() < one.needed()
    assert p.tp1.tp1 is None
    d = p.as_dict()
    assert d["tp1"]["device_peak"] == one.device_peak and d["bytes_read"] == p.bytes_read
    assert estimate(folder, "cuda", **OPTS).tp1 is None   # TP=1: nothing to compare with
