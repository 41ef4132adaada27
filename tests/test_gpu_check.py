"""tools/gpu_check.py --dry-run: the prepared GPU check keeps running on a CPU and writes its
report in the documented format (README, "On a GPU"), so it cannot rot between GPU sessions."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
STEPS = ["environment", "equality", "tests", "checkpoint", "memory", "bench"]
COLUMNS = ["step", "check", "status", "result", "target"]
STATUSES = {"ok", "failed", "timeout", "error", "skipped (no CUDA)", "skipped (dry run)"}
SKIP = "skipped (dry run)" if torch.cuda.is_available() else "skipped (no CUDA)"


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gpu_check")
    out = subprocess.run([sys.executable, str(ROOT / "tools" / "gpu_check.py"), "--dry-run", str(tmp / "out"),
                          "--tmp", str(tmp)], capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    assert not list(tmp.glob(".gpu-check-*")), "the work folder is removed at the end"
    return (json.loads((tmp / "out" / "gpu_check.json").read_text()),
            (tmp / "out" / "gpu_check.md").read_text(), out.stdout)


def test_json_has_every_step_with_a_status(dry_run):
    data, _, stdout = dry_run
    assert data["dry_run"] is True and data["device"] == "cpu" and data["ok"] is True
    assert list(data["steps"]) == STEPS
    for name, s in data["steps"].items():
        assert s["status"] in STATUSES, (name, s)
        assert s["seconds"] >= 0 and ("budget_s" in s), name
        assert f"] {name}: {s['status']}" in stdout, name          # progress line per step
    st = data["steps"]
    assert st["environment"]["torch"] == torch.__version__
    assert {g: r["status"] for g, r in st["equality"]["granularities"].items()} == \
        {"tensor": "ok", "channel": "ok", "block": "ok"}
    t = st["tests"]
    assert t["failed"] == t["errors"] == 0 and t["passed"] + t["skipped"] >= 8
    if not torch.cuda.is_available():
        assert t["passed"] == 0                                       # the CUDA cases skip here
    m = st["memory"]
    assert m["device_peak"] is None and m["retained"] > 0 and m["host_peak_above"] > 0
    b = st["bench"]
    assert b["h2d_gbps"] is None and set(b["ceiling"]) == {"read", "quantize", "cpu"}   # CPU: the shared-cores stage
    rows = {r["label"]: r for r in b["rows"]}
    assert rows["mmapload:mmap"]["status"] == "ok" and rows["mmapload:mmap"]["gbps"] > 0
    assert rows["mmapload:mmap"]["seconds"] > 0 and rows["mmapload:mmap"]["peak_rss_above"] > 0


def test_markdown_table_has_the_expected_columns_and_rows(dry_run):
    _, md, _ = dry_run
    lines = [l for l in md.splitlines() if l.startswith("|")]
    assert [c.strip() for c in lines[0].strip("|").split("|")] == COLUMNS
    rows = [[c.strip() for c in l.strip().strip("|").split("|")] for l in lines[2:]]
    assert all(len(r) == len(COLUMNS) for r in rows), rows
    assert [s for s in STEPS if s in {r[0] for r in rows}] == STEPS
    checks = {(r[0], r[1]): r for r in rows}
    for g in ("tensor", "channel", "block"):                          # CUDA parts say they were skipped
        assert checks[("equality", f"bit-equality {g}")][2] == SKIP
    assert checks[("memory", "device peak / retained")][2] == SKIP
    assert checks[("bench", "pinned H2D ceiling")][2] == SKIP
    assert checks[("memory", "host peak above start")][2] == "ok"
    assert checks[("bench", "mmapload:mmap")][2] == "ok" and "GB/s" in checks[("bench", "mmapload:mmap")][3]
    assert "skipped" in checks[("tests", "pytest -k cuda (test_device, test_load_into)")][3]
