"""tools/bench.py --tp 2 --quick: two gloo ranks per strategy, end to end. The per-rank rows are
there, in the table and the JSON alike, and mmapload's ranks each read their own slices (about half
of the checkpoint, exactly the bytes tp_layout plans) while the safe_open baseline hands every rank
every byte. No timing is asserted."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from mmapload.checkpoint import open_checkpoint
from mmapload.config import LoadOptions
from mmapload.decide import policy_for
from mmapload.tp_layout import heads_of, rank_slices
from mmapload.tp_ranges import byte_ranges

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "tools" / "bench.py"
MiB = 2**20
ROWS = ["safe_open", "mmapload:mmap"]

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")


@pytest.fixture(scope="module")
def tp2(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench_tp")
    out = subprocess.run([sys.executable, str(BENCH), "--tp", "2", "--quick", "--policy", "names", "--strategies",
                          ",".join(ROWS), "--keep", str(tmp / "ckpt"), "--json", str(tmp / "tp.json")],
                         capture_output=True, text=True, timeout=240, cwd=tmp)
    assert out.returncode == 0, out.stdout + out.stderr
    return json.loads((tmp / "tp.json").read_text()), out.stdout


def _planned_bytes(path, rank, world) -> int:
    """The checkpoint bytes rank ``rank`` of ``world`` owns: its slice of each sharded tensor, all
    of each replicated one (tp_layout's plan, as mmapload reads it)."""
    ckpt = open_checkpoint(path)
    opts = LoadOptions(policy="names")
    policy = policy_for(ckpt, opts)
    slices = rank_slices(ckpt.tensors, policy, opts.scheme, rank, world, heads=heads_of(policy.config))
    return sum(sum(b - a for a, b in byte_ranges(t.start, t.shape, t.itemsize, slices[t.name]))
               if t.name in slices else t.nbytes for t in ckpt.tensors)


def test_each_rank_reads_its_half(tp2):
    data, _ = tp2
    assert data["machine"]["tp"] == [2] and data["machine"]["strategies"] == ROWS
    (res,) = data["tp_results"]
    assert res["world"] == 2 and res["threads"] == 1          # 2 cores // 2 ranks (when run on 2+ cores)
    rows = {r["label"]: r for r in res["rows"]}
    assert list(rows) == ROWS and all(r["status"] == "ok" for r in rows.values()), rows
    base, mine = rows["safe_open"], rows["mmapload:mmap"]
    ckpt = open_checkpoint(res["checkpoint"])
    every = sum(t.nbytes for t in ckpt.tensors)
    assert [x["rank"] for x in mine["ranks"]] == [0, 1] == [x["rank"] for x in base["ranks"]]
    for x, y in zip(mine["ranks"], base["ranks"]):
        assert y["bytes_read"] == every                       # get_tensor hands every rank every byte
        assert x["bytes_read"] == _planned_bytes(res["checkpoint"], x["rank"], 2)
        assert 0.45 < x["bytes_read"] / y["bytes_read"] < 0.6, (x["bytes_read"], y["bytes_read"])
        assert x["x_base"]["bytes_read"] == pytest.approx(x["bytes_read"] / y["bytes_read"], rel=1e-12)
        assert x["collectives"] > 2 and y["collectives"] == 0   # plan check, amaxes, end check
        # the same slices: the same names and shapes kept, the same FP8 bytes and scales
        assert x["signature"] == y["signature"] and x["retained_bytes"] == y["retained_bytes"]
        for r in (x, y):
            assert r["seconds"] > 0 and r["cpu_seconds"] > 0 and r["peak_rss_above"] > 0 and r["threads"] == 1
            assert r["vmhwm"] and r["peak_anon_above"] is not None and r["storage_read"] >= 0
    # between them the ranks read every byte once, the replicated tensors (norms, the one kv head) twice
    assert every <= mine["sum"]["bytes_read"] < 1.1 * every
    assert mine["same_slices"] and mine["max"]["bytes_read"] == max(x["bytes_read"] for x in mine["ranks"])
    assert mine["max"]["seconds"] == max(x["seconds"] for x in mine["ranks"])


def _cells(stdout: str, header: str) -> list[dict[str, str]]:
    """The rows of the markdown table whose header line starts with ``header``."""
    lines = stdout.splitlines()
    at = next(i for i, l in enumerate(lines) if l.startswith(header))
    cols = [c.strip() for c in lines[at].strip("|").split("|")]
    rows = []
    for line in lines[at + 2:]:
        if not line.startswith("| "):
            break
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        assert len(cells) == len(cols), line
        rows.append(cells)
    return cols, rows


def test_table_has_per_rank_and_max_rows(tp2):
    data, stdout = tp2
    (res,) = data["tp_results"]
    cols, rows = _cells(stdout, "| strategy | io | rank |")
    assert cols[cols.index("bytes read (MiB)") + 1] == "x safe_open"
    got = [(r[0], r[1], r[2]) for r in rows]
    assert got == [("safe_open", "-", "0"), ("safe_open", "-", "1"), ("safe_open", "-", "**max**"),
                   ("mmapload", "mmap", "0"), ("mmapload", "mmap", "1"), ("mmapload", "mmap", "**max**")]
    by = {(r[0], r[2]): r for r in rows}
    b = cols.index("bytes read (MiB)")
    for row in res["rows"]:
        for x in row["ranks"] + [dict(row["max"], rank="**max**")]:
            cells = by[(row["strategy"], str(x["rank"]))]
            assert cells[cols.index("seconds")] == f"{x['seconds']:.2f}"
            assert float(cells[b]) == pytest.approx(x["bytes_read"] / MiB, abs=0.5)
            assert cells[b + 1] == f"{x['x_base']['bytes_read']:.2f}"
    assert 0.45 < float(by[("mmapload", "**max**")][b + 1]) < 0.6
    _, node = _cells(stdout, "| strategy | io | ranks |")
    assert [(r[0], r[2]) for r in node] == [("safe_open", "2"), ("mmapload", "2")]
    assert "scales are computed on each rank's slice, so they change with TP" in stdout
    assert "command: python tools/bench.py --tp 2 --quick" in stdout


def test_tp_arguments_are_checked(tmp_path):
    for args, msg in ((["--tp", "0"], "world sizes >= 1"), (["--tp", "2", "--strategies", "naive"], "safe_open"),
                      (["--row-weight", "16x0", "--tp", "2"], "ROWSxCOLS")):
        out = subprocess.run([sys.executable, str(BENCH), *args], capture_output=True, text=True, timeout=60,
                             cwd=tmp_path)
        assert out.returncode != 0 and msg in out.stderr, (args, out.stderr)
