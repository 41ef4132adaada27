"""tools/bench.py --convert: convert measured in a fresh process, a peer that cannot be imported
reported as skipped with the reason, and the output comparison able to tell equal from unequal."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mmapload import convert
from mmapload.synth import make_llama_checkpoint

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import bench_convert  # noqa: E402

MiB = 2**20


@pytest.mark.timeout(600)
def test_convert_mode_measures_mmapload_and_skips_a_missing_peer(tmp_path):
    blocked = tmp_path / "shadow" / "llmcompressor"
    blocked.mkdir(parents=True)
    (blocked / "__init__.py").write_text("raise ImportError('llmcompressor blocked by the test')\n")
    env = {"PYTHONPATH": str(tmp_path / "shadow")}
    out = subprocess.run([sys.executable, str(ROOT / "tools" / "bench.py"), "--convert", "--quick", "--granularity",
                          "channel", "--json", str(tmp_path / "b.json"), "--tmp", str(tmp_path)],
                         capture_output=True, text=True, timeout=600, env={**__import__("os").environ, **env})
    assert out.returncode == 0, out.stdout + out.stderr
    rows = {ln.split("|")[1].strip(): ln for ln in out.stdout.splitlines() if ln.startswith("| ")}
    assert "skipped" in rows["llmcompressor"] and "blocked by the test" in rows["llmcompressor"]
    got = json.loads((tmp_path / "b.json").read_text().splitlines()[-1])["convert"]
    mm = next(r for r in got["rows"] if r["tool"] == "mmapload")
    run = mm["runs"][0]
    assert mm["status"] == "ok" and run["seconds"] >= run["call"] > 0 and run["vmhwm"] >= run["base_rss"]
    assert run["out_bytes"] > 0 and f"{run['out_bytes']:,}" in rows["mmapload"]


def test_compare_tells_one_step_from_more(tmp_path):
    src = make_llama_checkpoint(tmp_path / "src", 4 * MiB, shards=1)
    ours = convert(src, tmp_path / "ours", granularity="channel")
    same = bench_convert.compare(src, ours, ours)
    assert same["same_names"] and same["weights"] > 0 and same["codes_differ"] == 0
    assert same["theirs_scale_is_bf16_of_ours"] == same["scales"] and same["rel_rms_ours"] == same["rel_rms_theirs"]
    assert same["byte_equal_weights"] == same["weights"]
    assert 0 < same["rel_rms_ours"] < 0.05
    # theirs: one weight's codes moved by one step here and by three there, its scales in bf16
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (shard,) = ours.glob("*.safetensors")
    t = load_file(shard)
    name = next(n for n, v in t.items() if v.dtype == torch.float8_e4m3fn)
    u = t[name].view(torch.uint8).clone()
    u[0, 0] = (u[0, 0] & 0x80) | max(1, min(0x7E, int(u[0, 0] & 0x7F) + 1))
    u[0, 1] = (u[0, 1] & 0x80) | max(3, min(0x7C, int(u[0, 1] & 0x7F) - 3))
    t[name] = u.view(torch.float8_e4m3fn)
    t[name + "_scale"] = t[name + "_scale"].bfloat16()
    save_file(t, theirs / shard.name)
    diff = bench_convert.compare(src, ours, theirs)
    assert diff["codes_differ"] == 2 and diff["codes_off_by_more_than_one"] == 1
    assert diff["scale_dtypes"] == ["float32 vs bfloat16", "float32 vs float32"]
    assert 0 < diff["theirs_scale_is_bf16_of_ours"] <= diff["scales"]
    assert diff["byte_equal_weights"] == diff["weights"] - 1   # the one changed weight
