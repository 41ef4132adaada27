"""Hostile and odd files (issue 13, part A): shards swapped or rewritten after validation, runs of
more buffers than IOV_MAX, FIFOs / devices / directories named as shards, raw exceptions that must
be typed errors, and shards named as the user sees them (a Hugging Face cache snapshot)."""

import json
import os
import signal
import struct
import time
import warnings
from contextlib import contextmanager

import pytest
import torch
from safetensors.torch import load_file, save_file

from mmapload import convert, iter_quantized, stream_quantize
from mmapload.checkpoint import open_checkpoint
from mmapload.errors import CheckpointError, FileChangedError, HeaderError, MmapLoadError, ShardIndexError
from mmapload.mapped import IOV_MAX
from mmapload.project import project

IO = ["mmap", "pread", "direct"]
pytestmark = pytest.mark.filterwarnings("ignore:mmapload. O_DIRECT")   # tmpfs: direct falls back


@contextmanager
def deadline(seconds: int = 10):
    """Fail, not hang, if the body blocks (a FIFO opened for reading waits for a writer)."""
    def _alarm(*_):
        raise TimeoutError(f"blocked for {seconds} s")
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _pair(tmp_path):
    """Two files of the same size whose headers disagree: read with the other's header, every
    value is wrong."""
    a, b = tmp_path / "model.safetensors", tmp_path / "other.safetensors"
    save_file({"x": torch.arange(64, dtype=torch.float32), "y": torch.ones(64, dtype=torch.float32)}, str(a))
    save_file({"x": torch.full((64,), 7.0), "y": torch.full((64,), -3.0)}, str(b))
    assert a.stat().st_size == b.stat().st_size
    return a, b


def _touch_later(path, before_ns):
    """Make sure the rewrite moved mtime (a write within the same clock tick may not)."""
    while os.stat(path).st_mtime_ns == before_ns:
        time.sleep(0.01)
        os.utime(path)


# ------------------------------------------------------------- 1. the file read is the file validated
@pytest.mark.parametrize("io", IO)
def test_shard_renamed_over_after_validation(tmp_path, io, no_thread_leak):
    a, b = _pair(tmp_path)
    it = iter_quantized(a, "cpu", io=io)          # headers validated here
    os.replace(b, a)                              # same size, another file
    with pytest.raises(FileChangedError, match=r"model\.safetensors: was replaced by another file"):
        next(it)


@pytest.mark.parametrize("io", IO)
def test_shard_rewritten_in_place_after_validation(tmp_path, io, no_thread_leak):
    a, b = _pair(tmp_path)
    it = iter_quantized(a, "cpu", io=io)
    before = os.stat(a).st_mtime_ns
    with open(a, "r+b") as f:                     # same inode, same size, other bytes
        f.write(b.read_bytes())
    _touch_later(a, before)
    with pytest.raises(FileChangedError, match="rewritten in place"):
        next(it)


def _many(tmp_path, n=48, width=4096):
    path = tmp_path / "model.safetensors"
    save_file({f"t{i:03d}": torch.full((width,), float(i)) for i in range(n)}, str(path))
    return path


@pytest.mark.parametrize("io", IO)
def test_shard_rewritten_in_place_during_load(tmp_path, io, no_thread_leak):
    path = _many(tmp_path)
    it = iter_quantized(path, "cpu", io=io, ring_bytes=64 << 10)   # 16 KiB slots: one tensor a batch
    name, t = next(it)
    assert name == "t000" and torch.equal(t, torch.zeros(4096))
    before = os.stat(path).st_mtime_ns
    data = bytearray(path.read_bytes())
    data[-4096 * 4:] = torch.full((4096,), -1.0).numpy().tobytes()   # the last tensor, in place
    with open(path, "r+b") as f:
        f.write(data)
    _touch_later(path, before)
    with pytest.raises(FileChangedError, match="rewritten in place"):
        for name, t in it:
            assert not torch.equal(t, torch.full((4096,), -1.0)), "changed bytes handed on"


@pytest.mark.parametrize("io", IO)
def test_shard_renamed_over_during_load_reads_the_validated_file(tmp_path, io, no_thread_leak):
    path = _many(tmp_path)
    other = tmp_path / "other.safetensors"
    save_file({f"t{i:03d}": torch.full((4096,), -1.0) for i in range(48)}, str(other))
    it = iter_quantized(path, "cpu", io=io, ring_bytes=64 << 10)
    first = next(it)
    os.replace(other, path)   # the open file is the validated one: it keeps being read
    got = dict([first, *it])
    assert all(torch.equal(got[f"t{i:03d}"], torch.full((4096,), float(i))) for i in range(48))


# ------------------------------------------------------------- 2. vectored reads <= IOV_MAX buffers
def test_iov_max_is_the_systems():
    assert IOV_MAX == (os.sysconf("SC_IOV_MAX") if os.sysconf("SC_IOV_MAX") > 0 else 1024)


@pytest.fixture
def many_scales(tmp_path):
    """More small F32 tensors in one file-contiguous run than one preadv takes (safetensors
    groups tensors by dtype: the scales of a large FP8 checkpoint look like this)."""
    path = tmp_path / "many.safetensors"
    tensors = {f"s{i:05d}": torch.full((3,), float(i)) for i in range(2 * IOV_MAX + 50)}
    save_file(tensors, str(path))
    return path, tensors


@pytest.mark.parametrize("io", IO)
def test_more_tensors_in_one_run_than_iov_max(many_scales, io, no_thread_leak):
    path, tensors = many_scales
    model = stream_quantize(path, "cpu", io=io)
    assert all(torch.equal(model[k], v) for k, v in tensors.items())


def test_convert_pread_more_tensors_than_iov_max(many_scales, tmp_path, no_thread_leak):
    path, tensors = many_scales
    convert(path, tmp_path / "out", io="pread")
    got = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert all(torch.equal(got[k], v) for k, v in tensors.items())


# ------------------------------------------------------------- 3. only regular files are shards
def _every_entry_point(path, tmp_path):
    with deadline():
        with pytest.raises(CheckpointError) as e1:
            stream_quantize(path, "cpu")
        with pytest.raises(CheckpointError) as e2:
            project(path, "cpu")
        with pytest.raises(CheckpointError) as e3:
            convert(path, tmp_path / "out")
    return [str(e.value) for e in (e1, e2, e3)]


def test_fifo_is_refused_not_opened(tmp_path):
    fifo = tmp_path / "model.safetensors"
    os.mkfifo(fifo)
    for msg in _every_entry_point(fifo, tmp_path):
        assert f"{fifo}: is a FIFO (named pipe), not a regular file" in msg


def test_fifo_or_device_in_a_folder_is_refused(tmp_path):
    ck = tmp_path / "ck"
    ck.mkdir()
    save_file({"a": torch.ones(2)}, str(ck / "a.safetensors"))
    os.mkfifo(ck / "b.safetensors")
    assert all("b.safetensors: is a FIFO" in m for m in _every_entry_point(ck, tmp_path))
    os.remove(ck / "b.safetensors")
    os.symlink("/dev/zero", ck / "b.safetensors")
    assert all("b.safetensors: is a character device" in m for m in _every_entry_point(ck, tmp_path))


def test_fifo_or_directory_named_by_the_index(tmp_path):
    ck = tmp_path / "ck"
    ck.mkdir()
    save_file({"a": torch.ones(2)}, str(ck / "a.safetensors"))
    os.mkfifo(ck / "b.safetensors")
    (ck / "c.safetensors").mkdir()
    for bad, kind in (("b.safetensors", r"a FIFO \(named pipe\)"), ("c.safetensors", "a directory")):
        (ck / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "a.safetensors",
                                                                                     "b": bad}}))
        with deadline(), pytest.raises(ShardIndexError, match=f"{bad}.*is {kind}, not a regular file"):
            open_checkpoint(ck)


@pytest.mark.parametrize("io", IO)
def test_fifo_swapped_in_after_validation_fails_fast(tmp_path, io, no_thread_leak):
    a, _ = _pair(tmp_path)
    it = iter_quantized(a, "cpu", io=io)
    os.remove(a)
    os.mkfifo(a)
    with deadline(), pytest.raises(FileChangedError):
        next(it)
