import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import mmapload
from mmapload._procmem import read_mem
from mmapload.readers import MappedShard
from mmapload.synth import make_llama_checkpoint


def test_view_is_zero_copy_and_holds_the_map(tmp_path):
    p = tmp_path / "f.bin"
    p.write_bytes(bytes(range(256)) * 64)
    shard = MappedShard(p, 256 * 64)
    v = shard.view(10, 20)
    assert v.tolist() == list(range(10, 20))
    shard.close()                      # the live view keeps the map valid: no segfault
    assert v.tolist() == list(range(10, 20))


def test_release_behind_drops_file_backed_rss(tmp_path):
    p = tmp_path / "f.bin"
    n = 64 << 20
    with open(p, "wb") as f:
        f.write(os.urandom(1 << 20) * 64)
    shard = MappedShard(p, n, drop_page_cache=False)
    dst = np.empty(n, dtype=np.uint8)
    before = read_mem().file
    shard.copy_into(0, n, dst)
    mapped = read_mem().file
    shard.release_behind(n)
    after = read_mem().file
    shard.close()
    assert mapped - before > 32 << 20          # the copy faulted the pages in
    assert after - before < 4 << 20            # and release dropped them again


@pytest.mark.parametrize("io,threads", [("mmap", 1), ("pread", 1), ("direct", 1), ("mmap", 3), ("pread", 3)])
def test_file_truncated_while_loading_is_an_error_never_sigbus(tmp_path, io, threads, no_thread_leak):
    # with 3 threads, 4 MiB slots: each batch's copy is split between them when the file shrinks
    shape, ring = ((1024, 1024), 16 << 20) if threads > 1 else ((128, 128), 64 << 10)
    tensors = {f"l{i}.weight": torch.randn(shape).bfloat16() for i in range(12)}
    path = tmp_path / "m.safetensors"
    save_file(tensors, path)
    gen = mmapload.iter_quantized(path, ring_bytes=ring, io=io, read_threads=threads)
    next(gen)
    os.truncate(path, path.stat().st_size // 2)
    with pytest.raises(mmapload.FileChangedError, match="m.safetensors"):
        for _ in gen:
            pass


def test_writer_and_synth_output_reads_back_with_safetensors(tmp_path):
    ckpt = make_llama_checkpoint(tmp_path, 3 << 20, shards=2)
    files = sorted(ckpt.glob("*.safetensors"))
    assert len(files) == 2
    ours = mmapload.stream_quantize(ckpt, skip=["*"])      # nothing quantized: exact copies
    n = 0
    for f in files:
        for name, t in load_file(f).items():
            assert torch.equal(ours[name], t), name
            n += 1
    assert n == len(ours) and not list(tmp_path.glob(".*partial"))
    assert abs(sum(f.stat().st_size for f in files) - (3 << 20)) < (3 << 20) * 0.35


def test_direct_falls_back_to_pread_with_a_warning_where_refused(tmp_path, monkeypatch):
    import errno
    import fcntl
    import mmapload.readers.pread as pread_mod
    real = os.preadv

    def refusing_preadv(fd, bufs, offset):       # what a filesystem without O_DIRECT does
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, bufs, offset)

    monkeypatch.setattr(pread_mod.os, "preadv", refusing_preadv)
    tensors = {"a.weight": torch.randn(300, 200), "b": torch.arange(10)}
    save_file(tensors, tmp_path / "m.safetensors")
    with pytest.warns(UserWarning, match="O_DIRECT"):
        model = mmapload.stream_quantize(tmp_path / "m.safetensors", io="direct")
    ref = mmapload.stream_quantize(tmp_path / "m.safetensors")
    assert torch.equal(model["b"], tensors["b"])
    assert torch.equal(model["a.weight"].data.view(torch.uint8), ref["a.weight"].data.view(torch.uint8))


def test_mmap_copies_fall_back_to_memcpy_where_process_vm_readv_is_refused(tmp_path, monkeypatch):
    import ctypes
    import errno
    import mmapload.readers.mapped as mapped_mod
    calls = []

    def refused(*args):                       # what a seccomp profile without it answers
        calls.append(args)
        ctypes.set_errno(errno.EPERM)
        return -1

    monkeypatch.setattr(mapped_mod, "_pvr", refused)
    tensors = {"a.weight": torch.randn(300, 200), "emb.embed.weight": torch.randn(50, 20), "b": torch.arange(10)}
    save_file(tensors, tmp_path / "m.safetensors")
    model = mmapload.stream_quantize(tmp_path / "m.safetensors", ring_bytes=64 << 10)
    monkeypatch.undo()
    ref = mmapload.stream_quantize(tmp_path / "m.safetensors", ring_bytes=64 << 10)
    assert len(calls) == 1                    # tried once per shard, then plain copies
    assert torch.equal(model["b"], tensors["b"]) and torch.equal(model["emb.embed.weight"], ref["emb.embed.weight"])
    assert torch.equal(model["a.weight"].data.view(torch.uint8), ref["a.weight"].data.view(torch.uint8))


@pytest.mark.parametrize("io", ["mmap", "pread", "direct"])
@pytest.mark.parametrize("length,stride", [(2048, 16384), (7168, 57344), (5, 7), (4096, 4097), (3, 400001)])
def test_strided_rows_are_the_files_bytes_in_every_mode(tmp_path, io, length, stride):
    """copy_strided (TP row slices, column pieces) against numpy's view of the file, for dense rows
    (one vectored call per span) and sparse ones (a read per row), rows spanning many calls."""
    import numpy as np
    from mmapload.readers import open_reader
    from mmapload.header import read_header
    from safetensors.numpy import save_file as save_np
    rows = 3000 if stride < 100000 else 12
    data = np.random.default_rng(0).integers(0, 256, rows * stride + 999, dtype=np.uint8)
    save_np({"x": data}, str(tmp_path / "s.safetensors"))
    shard = read_header(tmp_path / "s.safetensors")
    (x,) = shard.tensors
    with open_reader(io, shard, drop_page_cache=False, max_read=16 << 20) as r:
        dst = np.empty(rows * length, np.uint8)
        r.copy_strided(x.start + 123, stride, length, dst)
    want = np.lib.stride_tricks.as_strided(data[123:], (rows, length), (stride, 1)).reshape(-1)
    assert np.array_equal(dst, want)
