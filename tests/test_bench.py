"""tools/bench.py --quick: the table and the JSON agree, and every figure comes from the same run.

No timing is asserted (speed claims live in the benchmark's output, as ratios to a baseline of
the same run); what is checked is that the harness measures what it says and reports it
consistently: GB/s is bytes / seconds, the ratios divide by that run's ceiling and mmapload
row, every requested strategy is measured or skipped with a reason, all loaders built the
same FP8 model, and the page cache was in the state the mode promises.
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mmapload._procmem import fstype

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "tools" / "bench.py"
MiB = 2**20
REQUESTED = ["naive", "runai_capped", "fastsafetensors", "mmapload:mmap", "mmapload:direct"]
COLS = ["strategy", "io", "seconds", "GB/s", "x ceiling", "x naive best", "x mmapload (mmap)", "peak RSS above base (MiB)",
        "RSS x mmapload (mmap)", "peak anon above base (MiB)", "peak file above base (MiB)",
        "transient: RSS above base - retained (MiB)", "peak device (MiB)", "others' CPU"]


def _bench(args, tmp_path, block=()):
    """Run tools/bench.py; ``block``: peer packages made unimportable (in the children too)."""
    env = dict(os.environ)
    if block:
        shadow = tmp_path / "shadow"
        for mod in block:
            (shadow / mod).mkdir(parents=True)
            (shadow / mod / "__init__.py").write_text(f"raise ImportError('{mod} blocked by test_bench')\n")
        env["PYTHONPATH"] = os.pathsep.join([str(shadow), *filter(None, [env.get("PYTHONPATH")])])
    out = subprocess.run([sys.executable, str(BENCH), *args], capture_output=True, text=True, timeout=300,
                         env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    return out


def _table_rows(stdout: str) -> dict[str, dict[str, str]]:
    """The markdown table's rows by 'strategy:io' (or strategy for '-'), as {column: cell}."""
    lines = [l for l in stdout.splitlines() if l.startswith("| ")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header == COLS, header
    rows = {}
    for line in lines[1:]:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        assert len(cells) == len(COLS), line
        row = dict(zip(COLS, cells))
        key = row["strategy"] if row["io"] == "-" or row["strategy"].startswith("ceiling") else \
            f"{row['strategy']}:{row['io']}"
        rows[key] = row
    return rows


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench")
    out = _bench(["--quick", "--threads", "1", "--strategies", ",".join(REQUESTED),
                  "--json", str(tmp / "bench.json")], tmp, block=["fastsafetensors"])
    return json.loads((tmp / "bench.json").read_text()), out.stdout


def test_quick_reports_every_requested_strategy(quick):
    data, _ = quick
    m = data["machine"]
    assert m["cores"] >= 1 and m["ram_bytes"] > 0 and m["versions"]["torch"] and m["device_name"]
    assert m["cache"] == "warm" and m["cold_method"] is None and m["threads"] == 1
    assert m["strategies"] == REQUESTED
    (res,) = data["results"]
    assert res["size"] == 64 * MiB and 0.8 * res["size"] < res["checkpoint_bytes"] <= 1.2 * res["size"]
    rows = {r["label"]: r for r in res["rows"]}
    assert list(rows) == REQUESTED
    for label, r in rows.items():
        assert r["status"] in ("ok", "skipped"), (label, r)
        if r["status"] == "skipped":
            assert r["reason"].strip(), label
    for label in ("naive", "mmapload:mmap", "mmapload:direct"):
        assert rows[label]["status"] == "ok", rows[label]
    blocked = rows["fastsafetensors"]
    assert blocked["status"] == "skipped" and "cannot import fastsafetensors" in blocked["reason"]
    assert "blocked by test_bench" in blocked["reason"]


def test_quick_figures_are_computed_from_the_same_run(quick):
    data, _ = quick
    (res,) = data["results"]
    total, ceil = res["checkpoint_bytes"], res["ceiling"]
    stages = ceil["stages"]
    assert set(stages) == {"read", "quantize", "cpu"}     # CPU: no host->device stage; shared cores
    cpu = stages["cpu"]   # read and quantize share the cores: their CPU seconds over the cores
    assert cpu["cores"] >= 1 and stages["read"]["cpu_seconds"] > 0 and stages["quantize"]["cpu_seconds"] > 0
    assert cpu["seconds"] == pytest.approx(
        (stages["read"]["cpu_seconds"] + stages["quantize"]["cpu_seconds"]) / cpu["cores"], rel=1e-12)
    assert ceil["seconds"] == max(s["seconds"] for s in stages.values()) > 0
    assert stages[ceil["slowest"]]["seconds"] == ceil["seconds"]
    assert ceil["gbps"] == pytest.approx(total / ceil["seconds"] / 1e9, rel=1e-12)
    assert 0 < stages["quantize"]["bytes"] < total and stages["quantize"]["tensors"] > 0
    assert "buffered" in stages["read"]["how"]      # warm: buffered reads
    ok = [r for r in res["rows"] if r["status"] == "ok"]
    ref = next(r for r in ok if r["label"] == "mmapload:mmap")
    naive = next(r for r in ok if r["label"] == "naive")   # the only plain loader requested
    files = sum(os.path.getsize(p) for p in Path(res["checkpoint"]).glob("*.safetensors")) \
        if Path(res["checkpoint"]).exists() else None
    for r in ok:
        assert r["seconds"] > 0 and r["seconds_all"] == [r["seconds"]]   # --repeat 1
        assert r["gbps"] == pytest.approx(total / r["seconds"] / 1e9, rel=1e-12)
        assert r["x_ceiling"] == pytest.approx(r["seconds"] / ceil["seconds"], rel=1e-12)
        assert r["x_mmapload"] == pytest.approx(r["seconds"] / ref["seconds"], rel=1e-12)
        assert r["x_naive"] == pytest.approx(r["seconds"] / naive["seconds"], rel=1e-12)
        assert r["rss_x_mmapload"] == pytest.approx(r["peak_rss_above"] / ref["peak_rss_above"], rel=1e-12)
        assert r["peak_rss_above"] > 0 and r["peak_dev_alloc"] is None and r["threads"] == 1
        if sys.platform.startswith("linux"):
            assert r["peak_anon_above"] is not None and r["peak_file_above"] is not None
        # warm: the shards were in the page cache when the run started
        assert r["cached_before"][0] >= 0.95 * total
        if files is not None:
            assert r["cached_before"][0] <= files
    assert ref["x_mmapload"] == 1.0
    # the loaders all built the same FP8 model (same bytes retained)
    assert len({r["retained_bytes"] for r in ok}) == 1
    # the temporary checkpoint went away (no --keep)
    assert not Path(res["checkpoint"]).exists()


def test_quick_table_matches_the_json(quick):
    data, stdout = quick
    (res,) = data["results"]
    table = _table_rows(stdout)
    for r in res["rows"]:
        row = table[r["label"]]
        if r["status"] != "ok":
            assert row["seconds"].startswith(f"{r['status']}: ") and row["GB/s"] == "-"
            continue
        assert row["seconds"] == f"{r['seconds']:.2f}"
        assert row["GB/s"] == f"{r['gbps']:.2f}"
        assert row["x ceiling"] == f"{r['x_ceiling']:.2f}"
        assert row["x mmapload (mmap)"] == f"{r['x_mmapload']:.2f}"
        assert row["x naive best"] == f"{r['x_naive']:.2f}"
        assert row["peak RSS above base (MiB)"] == f"{r['peak_rss_above'] / MiB:.0f}"
        assert row["RSS x mmapload (mmap)"] == f"{r['rss_x_mmapload']:.1f}"
        assert row["peak anon above base (MiB)"] == f"{r['peak_anon_above'] / MiB:.0f}"
        assert row["peak file above base (MiB)"] == f"{r['peak_file_above'] / MiB:.0f}"
        assert row["transient: RSS above base - retained (MiB)"] == f"{r['transient_above'] / MiB:.0f}"
        assert r["transient_above"] < r["peak_rss_above"]
        assert row["peak device (MiB)"] == "-"
        assert row["others' CPU"] == f"{r['others_cpu']:.0%}" and 0 <= r["others_cpu"] <= 1.1   # jiffy granularity
    ceil = res["ceiling"]
    assert table["ceiling"]["seconds"] == f"{ceil['seconds']:.2f}" and table["ceiling"]["x ceiling"] == "1.00"
    for stage, s in ceil["stages"].items():
        assert table[f"ceiling: {stage}"]["seconds"] == f"{s['seconds']:.2f}"
    assert "command: python tools/bench.py --quick" in stdout


@pytest.mark.skipif(not hasattr(os, "posix_fadvise"), reason="needs posix_fadvise")
def test_cold_drops_the_shards_before_each_run(tmp_path):
    """--cold with fadvise (no machine-wide drop_caches in the test suite); --keep keeps the files."""
    keep = tmp_path / "ckpts"
    _bench(["--quick", "--cold", "--cold-method", "fadvise", "--threads", "1", "--repeat", "2",
            "--strategies", "mmapload:pread", "--keep", str(keep), "--json", str(tmp_path / "c.json")], tmp_path)
    data = json.loads((tmp_path / "c.json").read_text())
    assert data["machine"]["cache"] == "cold" and "fadvise" in data["machine"]["cold_method"]
    (res,) = data["results"]
    (row,) = res["rows"]
    assert row["status"] == "ok" and len(row["seconds_all"]) == 2
    assert row["seconds"] == pytest.approx(sum(row["seconds_all"]) / 2, rel=1e-12)   # median of two
    assert Path(res["checkpoint"]).parent == keep and Path(res["checkpoint"]).is_dir()
    if fstype(keep) not in ("tmpfs", "ramfs", "overlay"):
        assert all(c <= 0.05 * res["checkpoint_bytes"] for c in row["cached_before"]), row["cached_before"]
        assert "O_DIRECT" in res["ceiling"]["stages"]["read"]["how"]
    # a second run reuses the kept checkpoint instead of generating it again
    _bench(["--quick", "--strategies", "mmapload:mmap", "--keep", str(keep), "--json", str(tmp_path / "d.json")],
           tmp_path)
    again = json.loads((tmp_path / "d.json").read_text())["results"][0]
    assert again["reused"] and again["checkpoint"] == res["checkpoint"] and not res["reused"]


def _load_bench():
    spec = importlib.util.spec_from_file_location("mmapload_bench_tool", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_strategy_arguments_are_checked():
    bench = _load_bench()
    assert bench.parse_strategies("naive,mmapload") == [("naive", None), ("mmapload", "mmap"),
                                                        ("mmapload", "pread"), ("mmapload", "direct"),
                                                        ("mmapload", "view")]
    assert bench.parse_strategies("mmapload:direct,mmapload:direct,runai") == [("mmapload", "direct"),
                                                                              ("runai", None)]
    for bad in ("turbo", "naive:direct", "mmapload:async", ","):
        with pytest.raises(SystemExit) as e:
            bench.main(["--strategies", bad])
        assert e.value.code == 2
