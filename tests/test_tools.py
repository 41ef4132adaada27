"""The benchmarks must keep running (their numbers live in the README, not in tests)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_quantize_smoke():
    out = subprocess.run([sys.executable, str(ROOT / "tools" / "bench_quantize.py"), "--shape", "256x384",
                          "--repeat", "1", "--fp8", "e4m3"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    rows = [l for l in out.stdout.splitlines() if l.startswith("|") and "256x384" in l]
    assert len(rows) == 3 and all("yes" in r for r in rows), out.stdout
