"""Under a 700 MiB cgroup limit, convert() turns a 1.6 GiB checkpoint into FP8; the naive way is killed.

Each capped run is a fresh process started by tools/run_capped.py in its own memory cgroup;
the cgroup's peak counts anonymous memory and the page cache the run brings in. The shards
are dropped from the page cache before each run, so their pages are read (and charged) inside
the group rather than found already charged to this test process.
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mmapload.synth import make_llama_checkpoint

ROOT = Path(__file__).resolve().parents[1]
IO_MODES = ["mmap", "pread", "direct"]   # the io= modes converted under the limit
LIMIT = "700M"
LIMIT_BYTES = 700 << 20
RING = 64 << 20

_spec = importlib.util.spec_from_file_location("run_capped", ROOT / "tools" / "run_capped.py")
run_capped = sys.modules.setdefault("run_capped", importlib.util.module_from_spec(_spec))
_spec.loader.exec_module(run_capped)

_NO_CGROUP = run_capped.probe()
needs_cgroup = pytest.mark.skipif(_NO_CGROUP is not None, reason=f"no memory cgroup: {_NO_CGROUP}")


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    """A llama-shaped bf16 checkpoint of about 1.6 GiB in 2 shards (FP8 output ~0.8 GiB > the limit)."""
    src = make_llama_checkpoint(tmp_path_factory.mktemp("big") / "src", int(1.6 * 2**30), shards=2)
    assert sum(p.stat().st_size for p in src.glob("*.safetensors")) >= 1.5 * 2**30
    return src


def _evict(ckpt: Path) -> None:
    for f in ckpt.glob("*.safetensors"):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _capped(code: str, ckpt: Path) -> dict:
    """Run ``python -c code`` under LIMIT via tools/run_capped.py; its JSON report."""
    _evict(ckpt)
    out = subprocess.run([sys.executable, str(ROOT / "tools" / "run_capped.py"), "--mem", LIMIT, "--",
                          sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert out.returncode == report["exit_code"], out.stderr
    print(f"\n{out.stderr.strip().splitlines()[-1]}")
    report["stdout"], report["stderr"] = out.stdout, out.stderr
    return report


# stream_quantize (in memory) vs load_file of the output, tensor by tensor. In a fresh process, not
# this one: a child's ru_maxrss starts at its parent's peak RSS (vfork + exec), so holding the 1.6 GiB
# model here would inflate the peaks tests/memprobe.py reports for the rest of the session.
_COMPARE = """
import json, sys, torch, mmapload
from pathlib import Path
from safetensors.torch import load_file
src, dst, ring = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
want = mmapload.stream_quantize(src, "cpu", ring_bytes=ring)
got = {}
for f in sorted(dst.glob("*.safetensors")):
    got.update(load_file(f))
bits = lambda t: t.reshape(-1).view(torch.uint8)
bad, n_fp8 = [], 0
for name, t in want.items():
    fp8 = isinstance(t, mmapload.QuantizedTensor)
    pairs = [(name, t.data), (name + "_scale", t.scale)] if fp8 else [(name, t)]
    n_fp8 += fp8
    for k, w in pairs:
        g = got.pop(k, None)
        if g is not None and k.endswith("_scale") and g.numel() == w.numel():
            g = g.reshape(w.shape)   # compressed-tensors stores a per-tensor scale as [1]
        if g is None or g.dtype != w.dtype or g.shape != w.shape or not torch.equal(bits(g), bits(w)):
            bad.append(k)
print(json.dumps({"fp8": n_fp8, "bad": bad, "extra": sorted(got)}))
"""


def _compare(src: Path, dst: Path, ring: int) -> dict:
    out = subprocess.run([sys.executable, "-c", _COMPARE, str(src), str(dst), str(ring)], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@needs_cgroup
@pytest.mark.slow
@pytest.mark.parametrize("io", IO_MODES)
def test_convert_fits_under_the_limit_and_matches_in_memory(big, tmp_path, io):
    dst = tmp_path / "fp8"
    opts = dict(ring_bytes=RING, io=io)
    r = _capped(f"from mmapload.converter import convert; convert({str(big)!r}, {str(dst)!r}, **{opts!r})", big)
    assert r["exit_code"] == 0 and not r["oom_kill"], r["stderr"][-3000:]
    assert r["limit_bytes"] == LIMIT_BYTES and 0 < r["peak_bytes"] < LIMIT_BYTES

    same = _compare(big, dst, RING)
    assert same["bad"] == [] and same["extra"] == [] and same["fp8"] > 50, same


@needs_cgroup
@pytest.mark.slow
def test_naive_load_and_quantize_is_killed_under_the_same_limit(big, tmp_path):
    # tests/memprobe.py's naive loader (safetensors load_file + quantize, everything kept), then
    # save_file: a naive converter. load_file copies (backend="pread", like torch.load): with its
    # default mmap backend the group first thrashes on the shards' file pages and the OOM kill
    # comes after 4-60 s here (measured) instead of ~2 s.
    code = f"""
import functools, sys; sys.path.insert(0, {str(ROOT / 'tests')!r})
from pathlib import Path
import safetensors.torch as st
st.load_file = functools.partial(st.load_file, backend="pread")
import memprobe
_, keep = memprobe.naive(Path({str(big)!r}))
sd = {{}}
for k, v in keep.items():
    sd.update({{k: v[0], k + "_scale": v[1]}} if isinstance(v, tuple) else {{k: v}})
st.save_file(sd, {str(tmp_path / 'naive.safetensors')!r})
"""
    r = _capped(code, big)
    assert r["exit_code"] == 137 and r["oom_kill"], (r["exit_code"], r["stderr"][-3000:])
    assert r["peak_bytes"] >= LIMIT_BYTES - (8 << 20)


@needs_cgroup
def test_run_capped_passes_exit_codes_and_removes_its_group():
    r = run_capped.run_capped([sys.executable, "-c", "import sys; sys.exit(5)"], 256 << 20)
    assert (r.exit_code, r.oom_kill) == (5, False) and not Path(r.group).exists()
    r = run_capped.run_capped([sys.executable, "-c", "b = bytearray(400 << 20)"], 200 << 20)
    assert (r.exit_code, r.returncode, r.oom_kill) == (137, -9, True) and not Path(r.group).exists()
    assert r.peak_bytes >= (200 << 20) - (8 << 20)
    touch_100m = "b = bytearray(100 << 20); b[::4096] = b'x' * len(b[::4096])"
    r = run_capped.run_capped([sys.executable, "-c", touch_100m], 400 << 20)
    assert r.exit_code == 0 and (100 << 20) < r.peak_bytes < (400 << 20)
    r = run_capped.run_capped(["/nonexistent/cmd"], 64 << 20)
    assert r.exit_code == 127 and "cannot run" in r.error and not Path(r.group).exists()


@needs_cgroup
def test_run_capped_cli_reports_json_and_the_command_output(capfd):
    code = run_capped.main(["--mem", "300MiB", "--", sys.executable, "-c", "print('hello')"])
    out, err = capfd.readouterr()
    lines = out.strip().splitlines()
    assert code == 0 and lines[0] == "hello" and "peak" in err
    report = json.loads(lines[-1])
    assert report["limit_bytes"] == 300 << 20 and report["exit_code"] == 0 and report["oom_kill"] is False


def test_parse_mem():
    assert run_capped.parse_mem("700M") == run_capped.parse_mem("700MiB") == 700 << 20
    assert run_capped.parse_mem("1.5G") == 3 << 29 and run_capped.parse_mem("4096") == 4096
    with pytest.raises(ValueError):
        run_capped.parse_mem("lots")


def test_without_a_cgroup_it_says_why_and_runs_nothing(monkeypatch, tmp_path, capfd):
    def unavailable():
        raise run_capped.CgroupUnavailable("no memory controller here")

    monkeypatch.setattr(run_capped, "_v2", unavailable)
    monkeypatch.setattr(run_capped, "_v1", unavailable)
    assert run_capped.probe() == "v2: no memory controller here; v1: no memory controller here"
    marker = tmp_path / "ran"
    code = run_capped.main(["--mem", "700M", "--", "touch", str(marker)])
    out, err = capfd.readouterr()
    assert code == run_capped.EXIT_NO_CGROUP == 3 and not marker.exists()
    assert json.loads(out.strip().splitlines()[-1])["available"] is False and "no memory controller" in err
