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


def test_bench_quantize_takes_its_dtypes_from_the_table():
    """--dtype: the wide floats of mmapload.dtypes, by safetensors name; --fp8: its FP8 as e4m3 / e5m2."""
    out = subprocess.run([sys.executable, str(ROOT / "tools" / "bench_quantize.py"), "--shape", "64x96",
                          "--repeat", "1", "--dtype", "f16", "--fp8", "e5m2", "--granularity", "tensor"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "source f16" in out.stdout and "| 64x96 | tensor | e5m2 |" in out.stdout and "yes" in out.stdout
    bad = subprocess.run([sys.executable, str(ROOT / "tools" / "bench_quantize.py"), "--dtype", "fp8"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "'bf16', 'f16', 'f32', 'f64'" in bad.stderr, bad.stderr
