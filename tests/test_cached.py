"""drop_page_cache drops what a load read in, and only that: pages cached before it stay."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import mmapload
from mmapload._procmem import fstype
from mmapload.bench.sampler import page_cache_bytes
from mmapload import _pagecache as cached
from mmapload._pagecache import PAGE, Cached

MiB = 1 << 20


def _brute(pages, lo, hi):
    """The uncached runs of [lo, hi), page by page."""
    out, start = [], None
    for p in range(lo // PAGE, -(-hi // PAGE)):
        if not pages[p] and start is None:
            start = p
        if pages[p] and start is not None:
            out.append((start * PAGE, p * PAGE))
            start = None
    if start is not None:
        out.append((start * PAGE, min(hi, -(-hi // PAGE) * PAGE)))
    return [(max(lo, a), min(hi, b)) for a, b in out]


def test_read_in_is_the_uncached_runs():
    rng = np.random.default_rng(0)
    for trial in range(200):
        n = int(rng.integers(1, 40))
        pages = rng.random(n) < rng.random()
        lo = int(rng.integers(0, n)) * PAGE
        hi = int(rng.integers(lo // PAGE + 1, n + 1)) * PAGE
        assert Cached(pages).read_in(lo, hi) == _brute(pages, lo, hi), (pages, lo, hi)
    assert Cached(True).read_in(0, 8 * PAGE) == []
    assert Cached(False).read_in(PAGE, 8 * PAGE) == [(PAGE, 8 * PAGE)]
    assert Cached(np.ones(4, bool)).read_in(4 * PAGE, 4 * PAGE) == []


def _evict(path, lo=0):
    """Drop the file's pages from ``lo`` on out of the page cache."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, lo, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


@pytest.fixture
def half_warm(tmp_path):
    """A 32 MiB checkpoint whose first half is in the page cache and second half is not."""
    if not hasattr(os, "posix_fadvise") or fstype(tmp_path) in ("tmpfs", "ramfs"):
        pytest.skip("needs a filesystem whose clean pages posix_fadvise(DONTNEED) can drop")
    g = torch.Generator().manual_seed(0)
    path = tmp_path / "m.safetensors"
    save_file({f"layers.{i}.weight": torch.randn(1024, 1024, generator=g).bfloat16() for i in range(16)}, path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        f.read()
    _evict(path, size // 2 // PAGE * PAGE)
    warm = page_cache_bytes([path])
    if warm < size // 2 - MiB or warm > size // 2 + 4 * MiB:   # read-ahead may cache a little more
        pytest.skip(f"could not make half of the file cached here ({warm} of {size} bytes)")
    return path, warm


@pytest.mark.parametrize("io", ["mmap", "view", "pread"])
def test_a_load_leaves_the_page_cache_as_it_found_it(half_warm, io):
    path, warm = half_warm
    model = mmapload.stream_quantize(path, ring_bytes=4 * MiB, io=io)
    assert len(model) == 16
    after = page_cache_bytes([path])
    # the cached half stayed (dropping it was the old behaviour: a warm load left the file cold),
    # the half this load read in went again
    assert warm - 2 * MiB <= after <= warm + 2 * MiB, (warm, after)


def test_without_drop_page_cache_the_read_half_stays(half_warm):
    path, warm = half_warm
    mmapload.stream_quantize(path, ring_bytes=4 * MiB, io="pread", drop_page_cache=False)
    assert page_cache_bytes([path]) >= path.stat().st_size - 2 * MiB


def test_where_the_kernel_cannot_say_everything_read_is_dropped(half_warm, monkeypatch):
    path, warm = half_warm
    monkeypatch.setattr(cached, "count_cached", lambda fd, lo=0, length=0: None)
    monkeypatch.setattr(cached, "_per_page", lambda fd, size, counted=False: None)
    mmapload.stream_quantize(path, ring_bytes=4 * MiB, io="pread")
    monkeypatch.undo()   # observed with the kernel's answers (the probe shares _pagecache)
    assert page_cache_bytes([path]) <= 2 * MiB


def test_a_partly_cached_file_is_asked_page_by_page(half_warm):
    path, warm = half_warm
    fd = os.open(path, os.O_RDONLY)
    try:
        c = Cached.of(fd, path.stat().st_size)
    finally:
        os.close(fd)
    size = path.stat().st_size
    assert c.read_in(0, PAGE) == []                        # the first page (the header) was cached
    gone = c.read_in(0, size - size % PAGE)
    assert sum(b - a for a, b in gone) == pytest.approx(size - warm, abs=2 * MiB)
    assert gone[-1][1] == size - size % PAGE and gone[0][0] >= size // 2 - MiB


def test_a_partly_cached_file_is_counted_per_window_then_asked_page_by_page(half_warm, monkeypatch):
    # 1 MiB windows: the cached half's windows are counted whole, the rest asked with mincore
    path, warm = half_warm
    size = path.stat().st_size
    fd = os.open(path, os.O_RDONLY)
    try:
        whole = Cached.of(fd, size)
        monkeypatch.setattr(cached, "_WINDOW_PAGES", MiB // PAGE)
        asked = []
        real = cached._mincore
        monkeypatch.setattr(cached, "_mincore", lambda a, n, v: asked.append(n) or real(a, n, v))
        windowed = Cached.of(fd, size)
        counts = cached.count_cached(fd) is not None
    finally:
        os.close(fd)
    if not counts:
        pytest.skip("no cachestat here: every window is asked with mincore")
    end = size - size % PAGE
    assert windowed.read_in(0, end) == whole.read_in(0, end)
    assert len(asked) <= 2 and sum(asked) <= 2 * MiB     # only the window(s) at the boundary


def test_without_cachestat_mincore_alone_tells_the_cached_half(half_warm, monkeypatch):
    path, warm = half_warm
    monkeypatch.setattr(cached, "count_cached", lambda fd, lo=0, length=0: None)
    mmapload.stream_quantize(path, ring_bytes=4 * MiB, io="view")
    monkeypatch.undo()
    assert warm - 2 * MiB <= page_cache_bytes([path]) <= warm + 2 * MiB


def _cold_checkpoint(tmp_path, tensors):
    if not hasattr(os, "posix_fadvise") or fstype(tmp_path) in ("tmpfs", "ramfs"):
        pytest.skip("needs a filesystem whose clean pages posix_fadvise(DONTNEED) can drop")
    path = tmp_path / "m.safetensors"
    save_file(tensors, path)
    _evict(path)
    if page_cache_bytes([path]) > 0:
        pytest.skip("could not drop the file from the page cache here")
    return path


@pytest.mark.parametrize("io", ["mmap", "pread", "view"])
def test_the_header_pages_a_load_read_in_go_too(tmp_path, io):
    # the header is read (with the kernel's read-ahead past it) when the checkpoint is opened, before
    # the readers: the snapshot is taken before that read (Shard.cached), so those pages count as read in
    g = torch.Generator().manual_seed(0)
    path = _cold_checkpoint(tmp_path, {f"model.layers.{i}.mlp.experts.{j}.up_proj.weight":
                                       torch.randn(64, 256, generator=g).bfloat16() for i in range(4) for j in range(256)})
    mmapload.stream_quantize(path, ring_bytes=8 * MiB, io=io, policy="names")
    assert page_cache_bytes([path]) == 0


@pytest.mark.parametrize("io", ["mmap", "pread"])
def test_a_load_stopped_early_drops_what_it_read_ahead(tmp_path, io):
    # iter_quantized closed early (also: a guess found wrong, an error): its read-ahead leaves too, so
    # the next load does not take those pages for "cached before" and keep them
    g = torch.Generator().manual_seed(0)
    path = _cold_checkpoint(tmp_path, {f"model.layers.{i}.mlp.up_proj.weight":
                                       torch.randn(1024, 1024, generator=g).bfloat16() for i in range(24)})
    it = mmapload.iter_quantized(path, ring_bytes=8 * MiB, io=io)
    for _, _ in zip(range(3), it):
        pass
    it.close()
    assert page_cache_bytes([path]) <= MiB
    mmapload.stream_quantize(path, ring_bytes=8 * MiB, io=io)
    assert page_cache_bytes([path]) <= MiB


_NOT_OURS = """
import os, sys, mmapload
from mmapload._pagecache import Cached, count_cached
fd = os.open(sys.argv[1], os.O_RDONLY)
assert count_cached(fd) is None, "cachestat answered for a file we may not write"
assert Cached.of(fd, os.path.getsize(sys.argv[1])).read_in(0, 4 * 4096) == [(0, 4 * 4096)]
os.close(fd)
mmapload.stream_quantize(sys.argv[1], ring_bytes=4 << 20, io=sys.argv[2], policy="names")
"""


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0 or not shutil.which("setpriv"),
                    reason="needs root (to chown) and setpriv (to drop the capabilities)")
@pytest.mark.parametrize("io", ["mmap", "pread", "view"])
def test_a_file_we_may_not_write_is_taken_for_uncached(tmp_path, io):
    # the kernel will not tell (cachestat: EPERM; mincore: "all resident"): nothing counts as cached,
    # so a cold load of another user's read-only checkpoint does not leave it in the page cache
    g = torch.Generator().manual_seed(0)
    path = _cold_checkpoint(tmp_path, {f"model.layers.{i}.mlp.up_proj.weight":
                                       torch.randn(1024, 1024, generator=g).bfloat16() for i in range(8)})
    os.chown(path, 65534, 65534)
    os.chmod(path, 0o444)
    tmp_path.chmod(0o755)
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    r = subprocess.run(["setpriv", "--bounding-set=-all", "--inh-caps=-all", sys.executable, "-c", _NOT_OURS,
                        str(path), io], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert page_cache_bytes([path]) <= 2 * MiB
