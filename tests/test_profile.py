"""mmapload.bench.sampler (the sampler) and ``python -m mmapload profile`` (loaders side by side)."""

import csv
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from mmapload._procmem import fstype
from mmapload.errors import DeviceError, OptionsError
from mmapload.bench.sampler import METRICS, MemorySampler, mark, page_cache_bytes
from mmapload.bench import sampler as sampler_mod

MiB = 2**20
RING = 16 * MiB


def _evict(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


# -- the sampler ---------------------------------------------------------------------------
def test_samples_are_recorded_in_time_order():
    with MemorySampler(interval=0.005) as s:
        time.sleep(0.15)
    assert len(s.samples) >= 8
    ts = [x.t for x in s.samples]
    assert ts == sorted(ts) and ts[-1] >= 0.15
    assert all(x.rss > 0 and x.page_cache is None and x.dev_alloc is None for x in s.samples)
    if sys.platform.startswith("linux"):
        assert all(x.anon > 0 and x.file > 0 for x in s.samples)
    n = len(s.samples)
    time.sleep(0.03)
    assert len(s.samples) == n, "a stopped sampler kept sampling"


def test_markers_are_recorded_in_order_and_label_the_samples():
    mark("before")                          # nobody listens: a no-op
    with MemorySampler(interval=0.005) as s, MemorySampler(interval=0.005) as other:
        for phase in ("open", "read", "read", "quantize", "done"):
            mark(phase)
            time.sleep(0.02)
    mark("after")
    assert [p for _, p in s.markers] == ["open", "read", "quantize", "done"]
    assert [p for _, p in other.markers] == ["open", "read", "quantize", "done"]
    times = [t for t, _ in s.markers]
    assert times == sorted(times)
    phases = [x.phase for x in s.samples]
    assert phases[0] == "" and phases[-1] == "done"
    # the labels change only at markers, in marker order
    runs = [p for i, p in enumerate(phases) if i == 0 or p != phases[i - 1]]
    assert runs == ["", "open", "read", "quantize", "done"]
    for t, p in s.markers:   # a sample taken at each marker carries it
        assert any(x.t >= t and x.phase == p for x in s.samples)


def test_mark_is_thread_safe():
    with MemorySampler(interval=0.002) as s:
        def work(k):
            for j in range(100):
                mark(f"t{k}-{j}")
        threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    got = [p for _, p in s.markers]
    assert len(got) == 400
    for k in range(4):
        mine = [p for p in got if p.startswith(f"t{k}-")]
        assert mine == [f"t{k}-{j}" for j in range(100)]
    assert len(s.samples) >= 400


def test_peak_is_the_max_of_the_samples_and_sees_an_allocation():
    with MemorySampler(interval=0.005) as s:
        time.sleep(0.03)
        block = np.ones(256 * MiB, dtype=np.uint8)   # written: resident anonymous memory
        time.sleep(0.05)
        del block
        time.sleep(0.05)
    first, last = s.samples[0], s.samples[-1]
    for m in METRICS:
        vals = [getattr(x, m) for x in s.samples if getattr(x, m) is not None]
        assert s.peak(m) == (max(vals) if vals else None)
    assert s.peaks() == {m: s.peak(m) for m in METRICS}
    assert s.peak() == s.peak("rss") >= first.rss + 200 * MiB
    if first.anon is not None:
        assert s.peak("anon") >= first.anon + 200 * MiB
    assert last.rss < s.peak() - 200 * MiB     # freed again: the timeline shows the bump


def test_page_cache_follows_reads_and_evictions(tmp_path):
    if not hasattr(os, "posix_fadvise") or fstype(tmp_path) in ("tmpfs", "ramfs"):
        pytest.skip("needs a filesystem whose clean pages posix_fadvise(DONTNEED) can drop")
    f = tmp_path / "blob.bin"
    f.write_bytes(os.urandom(32 * MiB))
    _evict(f)
    assert page_cache_bytes([f]) <= 2 * MiB
    def settle(phase):   # a few samples in this phase, however busy the machine is
        deadline = time.monotonic() + 5
        while sum(x.phase == phase for x in s.samples) < 3 and time.monotonic() < deadline:
            time.sleep(0.005)

    with MemorySampler(interval=0.005, files=[f], cache_interval=0.0) as s:
        settle("")
        mark("reading")
        with open(f, "rb") as fh:
            fh.read()
        mark("read")
        settle("read")
        assert page_cache_bytes([f]) >= 30 * MiB
        mark("evicting")   # samples taken during the eviction are neither warm nor evicted
        _evict(f)
        mark("evicted")
        settle("evicted")
    cold = [x.page_cache for x in s.samples if x.phase == ""]
    warm = [x.page_cache for x in s.samples if x.phase == "read"]
    evicted = [x.page_cache for x in s.samples if x.phase == "evicted"]
    assert max(cold) <= 2 * MiB
    assert min(warm[1:]) >= 30 * MiB and max(warm) <= 32 * MiB   # [0]: taken at the marker
    assert evicted[-1] <= 2 * MiB
    assert s.peak("page_cache") >= 30 * MiB
    # sampling the cache maps the file but never touches it: RSS does not grow by the file
    assert s.peak("file") - s.samples[0].file < 16 * MiB


def test_sampler_rejects_bad_arguments(tmp_path):
    with pytest.raises(OptionsError):
        MemorySampler(interval=0)
    with pytest.raises(OptionsError):
        MemorySampler(interval=float("nan"))
    with pytest.raises(OptionsError):
        MemorySampler().peak("vram")
    import torch
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError):
            MemorySampler(device="cuda:0")
    with pytest.raises(FileNotFoundError):
        MemorySampler(files=[tmp_path / "missing.safetensors"]).start()
    s = MemorySampler()
    with s:
        pass
    with pytest.raises(RuntimeError):
        s.start()


# -- the profile command -------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory):
    from mmapload.synth import make_llama_checkpoint
    return make_llama_checkpoint(tmp_path_factory.mktemp("prof"), 256 * MiB, shards=2)


def _profile(args, cwd=None, block_matplotlib=False):
    pre = "import sys; sys.modules['matplotlib'] = None; " if block_matplotlib else "import sys; "
    code = pre + "from mmapload.cli import main; sys.exit(main(sys.argv[1:]))"
    # one torch thread per loader: the comparison is about memory, and on a busy 2-core CI box
    # a 2-thread OpenMP team next to mmapload's reader thread makes timings erratic
    out = subprocess.run([sys.executable, "-c", code, "profile", "--threads", "1", *map(str, args)],
                         capture_output=True, text=True, timeout=300, cwd=cwd)
    assert out.returncode == 0, out.stdout + out.stderr
    return out


def _timeline(path: Path) -> dict[str, list[dict]]:
    rows: dict[str, list[dict]] = {}
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            rows.setdefault(r["strategy"], []).append(r)
    return rows


def _csv_max(rows, col):
    vals = [int(r[col]) for r in rows if r[col] != ""]
    return max(vals) if vals else None


@pytest.fixture(scope="module")
def profiled(small_checkpoint, tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("profile-out")
    out = _profile([small_checkpoint, "--ring-bytes", "16MiB", "--out", out_dir, "--interval", "0.005"])
    return out_dir, out.stdout


def test_profile_writes_files_that_agree(profiled):
    out_dir, stdout = profiled
    summary = json.loads((out_dir / "summary.json").read_text())
    rows = _timeline(out_dir / "timeline.csv")
    assert list(summary["strategies"]) == list(rows) == ["mmapload", "naive", "safe_open"]
    assert summary["cache"] == "warm" and summary["ring_bytes"] == RING and summary["threads"] == 1
    with open(out_dir / "timeline.csv") as f:
        assert f.readline().strip() == "strategy,t,rss,anon,file,page_cache,dev_alloc,dev_reserved,phase"
    for name, s in summary["strategies"].items():
        r = rows[name]
        assert len(r) == s["samples"] > 3
        for col, key in [("rss", "peak_rss"), ("anon", "peak_anon"), ("file", "peak_file"),
                         ("page_cache", "peak_page_cache"), ("dev_alloc", "peak_dev_alloc"),
                         ("dev_reserved", "peak_dev_reserved")]:
            assert _csv_max(r, col) == s[key], (name, col)
        assert s["peak_dev_alloc"] is None and s["peak_page_cache"] is not None
        ts = [float(x["t"]) for x in r]
        assert ts == sorted(ts) and ts[-1] >= s["seconds"] * 0.9
        assert 0 < s["baseline_rss"] <= s["peak_rss"]
        assert r[-1]["phase"] == "done"
        assert s["seconds"] > 0 and s["retained_bytes"] > 0
    # every strategy produced the same FP8 model
    assert len({s["retained_bytes"] for s in summary["strategies"].values()}) == 1
    phases = [x["phase"] for x in rows["naive"]]
    assert [p for i, p in enumerate(phases) if i == 0 or p != phases[i - 1]] == \
        ["", "open", "read", "quantize", "done"]
    # the printed table: one line per strategy
    for name in summary["strategies"]:
        assert any(line.startswith(name + " ") for line in stdout.splitlines()), stdout
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert not (out_dir / "memory.png").exists()
        assert "pip install mmapload[plot]" in stdout
    else:
        png = (out_dir / "memory.png").read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_mmapload_keeps_less_of_the_file_mapped_than_naive(profiled):
    out_dir, _ = profiled
    s = json.loads((out_dir / "summary.json").read_text())["strategies"]
    ours = s["mmapload"]["peak_file"] - s["mmapload"]["baseline_file"]
    naive = s["naive"]["peak_file"] - s["naive"]["baseline_file"]
    assert ours < naive
    assert ours <= RING + 32 * MiB < naive   # naive maps whole shards (~128 MiB each)


def test_projection_bounds_the_measured_host_peak(profiled, small_checkpoint):
    from mmapload.estimate import estimate
    out_dir, _ = profiled
    s = json.loads((out_dir / "summary.json").read_text())["strategies"]["mmapload"]
    p = estimate(small_checkpoint, "cpu", ring_bytes=RING)
    assert p.retained_bytes == s["retained_bytes"]
    measured = s["peak_rss"] - s["baseline_rss"]
    assert measured <= p.host_peak, (measured, p.host_terms)
    assert s["ru_maxrss"] - s["baseline_rss"] <= p.host_peak


def test_profile_without_matplotlib_cold_cache_and_a_pre_pass(small_checkpoint, tmp_path):
    """A 4 MiB ring forces the per-tensor amax pre-pass; matplotlib is made unimportable."""
    from mmapload.estimate import estimate
    p = estimate(small_checkpoint, "cpu", ring_bytes=4 * MiB)
    assert p.prepass > 0
    out = _profile([small_checkpoint, "--strategies", "mmapload", "--ring-bytes", "4MiB", "--cold",
                    "--out", tmp_path / "o", "--interval", "0.005"], block_matplotlib=True)
    assert "pip install mmapload[plot]" in out.stdout
    assert sorted(x.name for x in (tmp_path / "o").iterdir()) == ["summary.json", "timeline.csv"]
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    s = summary["strategies"]["mmapload"]
    assert summary["cache"] == "cold" and list(summary["strategies"]) == ["mmapload"]
    assert s["peak_rss"] - s["baseline_rss"] <= p.host_peak
    rows = _timeline(tmp_path / "o" / "timeline.csv")["mmapload"]
    if fstype(small_checkpoint) not in ("tmpfs", "ramfs"):
        assert int(rows[0]["page_cache"]) <= 4 * MiB     # --cold: nothing cached at the start


def test_profile_rejects_unknown_strategies(small_checkpoint, capsys):
    from mmapload.cli import main
    with pytest.raises(SystemExit) as e:
        main(["profile", str(small_checkpoint), "--strategies", "mmapload,turbo"])
    assert e.value.code == 2 and "turbo" in capsys.readouterr().err


def test_the_page_cache_probe_takes_at_most_a_fiftieth_of_a_core(tmp_path, monkeypatch):
    # a probe costs in proportion to the cached pages (mincore every 0.1 s over a warm 4 GiB
    # checkpoint kept a core busy and slowed every loader the bench watched): by default the
    # sampler waits 50x as long as the last probe took before the next
    f = tmp_path / "blob.bin"
    f.write_bytes(b"\0" * MiB)
    probes = []

    def slow(self):
        probes.append(time.perf_counter())
        time.sleep(0.02)
        return 0

    monkeypatch.setattr(sampler_mod._CacheProbe, "resident", slow)
    with MemorySampler(interval=0.001, files=[f]) as s:
        time.sleep(2.5)
    gaps = [b - a for a, b in zip(probes, probes[1:-1])]   # the last one is stop()'s
    assert len(probes) >= 3 and min(gaps) >= 1.0, gaps     # 50 x 0.02 s
    assert len(s.samples) > 100                            # memory still sampled every interval
    probes.clear()
    with MemorySampler(interval=0.001, files=[f], cache_interval=0.0):
        time.sleep(0.5)
    assert len(probes) >= 10                               # a fixed interval is kept as asked
