"""Host memory contract, measured in fresh subprocesses on a >= 1 GiB checkpoint."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

PROBE = Path(__file__).with_name("memprobe.py")
RING = 64 << 20
MiB = 2**20


def _probe(which: str, ckpt: Path, io: str = "mmap") -> dict:
    out = subprocess.run([sys.executable, str(PROBE), which, str(ckpt), str(RING), "tensor", io],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    r["over"] = r["peak_rss"] - r["base_rss"] - r["retained"]
    r["file_over"] = r["peak_file"] - r["base_file"]
    print(f"{which} ({io}): peak RSS - base - retained = {r['over'] / MiB:.0f} MiB, "
          f"RssFile peak - base = {r['file_over'] / MiB:.0f} MiB, retained {r['retained'] / MiB:.0f} MiB, "
          f"{r['seconds']:.2f} s")
    return r


@pytest.mark.slow
def test_host_peak_is_bounded_by_the_ring_and_naive_is_not(gib_checkpoint):
    size = sum(p.stat().st_size for p in Path(gib_checkpoint).glob("*.safetensors"))
    assert size >= 2**30
    ours = _probe("mmapload", gib_checkpoint)
    assert ours["over"] <= RING + 200 * MiB
    assert ours["file_over"] <= RING + 64 * MiB
    # io="view" quantizes from the map: the pages in flight are file-backed and bounded the same way
    view = _probe("mmapload", gib_checkpoint, "view")
    assert view["over"] <= RING + 200 * MiB and view["file_over"] <= RING + 64 * MiB
    naive = _probe("naive", gib_checkpoint)
    # the same bound, applied to the naive load_file + quantize path, must fail
    assert naive["over"] > RING + 200 * MiB or naive["file_over"] > RING + 64 * MiB
    assert naive["file_over"] > 2 * ours["file_over"]
