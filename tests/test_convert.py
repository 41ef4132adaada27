"""convert(): an FP8 checkpoint on disk, streamed, identical to the in-memory load, failure-safe."""

import builtins
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import mmapload
import mmapload.checkpoint as ckmod
from mmapload import converter as export
from mmapload.checkpoint import INDEX_NAME, open_checkpoint, read_header
from mmapload.fp8 import scale_shape
from mmapload.config import LoadOptions
from mmapload.decide import policy_for
from mmapload.synth import make_llama_checkpoint
from mmapload.writer import SafetensorsWriter

ROOT = Path(__file__).resolve().parents[1]
SHARDS = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
EXTRAS = {"tokenizer.json": '{"version": "1.0", "model": {"type": "BPE"}}',
          "generation_config.json": '{"do_sample": false}'}


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """~4 MiB llama-shaped bf16 checkpoint, 2 shards, config + tokenizer + a hidden file + a subfolder."""
    src = make_llama_checkpoint(tmp_path_factory.mktemp("small") / "src", 4 << 20, shards=2)
    for name, text in EXTRAS.items():
        (src / name).write_text(text)
    (src / ".gitattributes").write_text("*.safetensors filter=lfs\n")
    (src / "sub").mkdir()
    (src / "sub" / "notes.txt").write_text("not copied")
    return src


def _load_dir(d: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.numel() == b.numel() == 1:     # compressed-tensors' per-tensor scale: [1], ours: []
        a = a.reshape(b.shape)
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(_bits(a), _bits(b))


def _no_partials(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if "partial" in p.name]


@pytest.mark.parametrize("granularity", ["tensor", "channel", "block"])
def test_convert_writes_what_stream_quantize_holds(small, tmp_path, granularity, no_thread_leak):
    opts = dict(granularity=granularity, ring_bytes=256 << 10, block_size=(32, 64))
    dst = export.convert(small, tmp_path / "fp8", **opts)
    assert dst == tmp_path / "fp8"
    assert sorted(p.name for p in dst.iterdir()) == sorted(SHARDS + [INDEX_NAME, "config.json", *EXTRAS])
    for name in EXTRAS:
        assert (dst / name).read_bytes() == (small / name).read_bytes()
    config = json.loads((dst / "config.json").read_text())
    assert config.pop("quantization_config")["quant_method"] == "compressed-tensors"
    assert config == json.loads((small / "config.json").read_text())
    assert _no_partials(tmp_path) == [] and not any(p.name.endswith(".partial") for p in dst.iterdir())

    lo = LoadOptions(**opts)
    policy = policy_for(open_checkpoint(small), lo)
    src_specs = {s.name: s for s in open_checkpoint(small).tensors}
    index = json.loads((dst / INDEX_NAME).read_text())
    total, n_quantized = 0, 0
    for fname in SHARDS:
        shard = read_header(dst / fname)
        meta = json.loads(shard.metadata["mmapload"])
        assert shard.metadata["format"] == "pt"
        assert meta == {"granularity": granularity, "fp8_dtype": "float8_e4m3fn", "block_size": [32, 64],
                        "scale_suffix": "_scale"}
        names = [s.name for s in shard.tensors]          # file order
        for i, spec in enumerate(shard.tensors):
            assert index["weight_map"][spec.name] == fname
            total += spec.nbytes
            if spec.name.endswith("_scale"):
                continue
            src = src_specs[spec.name]
            assert src.shard.name == fname                # sharded like the input
            assert spec.shape == src.shape
            if policy(src):
                n_quantized += 1
                assert spec.dtype == "F8_E4M3"
                scale = shard.tensors[i + 1]
                assert scale.name == spec.name + "_scale" and names[i + 1] == scale.name
                assert scale.dtype == "F32" and scale.shape == (scale_shape(src.shape, granularity, (32, 64))
                                                                or (1,))
            else:
                assert spec.dtype == src.dtype
    assert index["metadata"]["total_size"] == total
    assert len(index["weight_map"]) == len(src_specs) + n_quantized
    assert n_quantized > 10

    want = mmapload.stream_quantize(small, **opts).state_dict()
    got = _load_dir(dst)
    assert got.keys() == want.keys()
    bad = [k for k in want if not _same(got[k], want[k])]
    assert not bad, f"differ from the in-memory load: {bad[:5]}"


def test_single_file_input_becomes_model_safetensors(small, tmp_path):
    src = tmp_path / "weights.safetensors"
    src.write_bytes((small / SHARDS[0]).read_bytes())
    dst = export.convert(src, tmp_path / "out", granularity="channel")
    assert sorted(p.name for p in dst.iterdir()) == ["model.safetensors", INDEX_NAME]
    assert set(json.loads((dst / INDEX_NAME).read_text())["weight_map"].values()) == {"model.safetensors"}
    want = mmapload.stream_quantize(src, granularity="channel").state_dict()
    got = load_file(dst / "model.safetensors")
    assert got.keys() == want.keys() and all(_same(got[k], want[k]) for k in want)


def test_convert_reads_the_index_config_and_each_header_once(small, tmp_path, monkeypatch, no_thread_leak):
    """One open_checkpoint: the index, config.json and every shard header are read once; each
    shard is opened once more, by the reader, for its data."""
    opened, headers = [], []
    real_open, real_os_open, real_read_header = builtins.open, os.open, ckmod.read_header

    def seen(path):
        if isinstance(path, (str, os.PathLike)) and Path(path).parent == small:
            opened.append(Path(path).name)

    def counted_open(path, *a, **k):
        seen(path)
        return real_open(path, *a, **k)

    def counted_os_open(path, *a, **k):
        seen(path)
        return real_os_open(path, *a, **k)

    def counted_read_header(path):   # check_written reads the output's headers back: not counted
        if Path(path).parent == small:
            headers.append(Path(path).name)
        return real_read_header(path)
    for obj, name, fn in [(builtins, "open", counted_open), (io, "open", counted_open),
                          (os, "open", counted_os_open), (ckmod, "read_header", counted_read_header)]:
        monkeypatch.setattr(obj, name, fn)
    dst = export.convert(small, tmp_path / "out", policy="names")
    monkeypatch.undo()
    assert sorted(headers) == SHARDS
    assert {n: opened.count(n) for n in set(opened)} == {INDEX_NAME: 1, "config.json": 1, SHARDS[0]: 2,
                                                          SHARDS[1]: 2, **{n: 1 for n in EXTRAS}}
    assert json.loads((dst / "config.json").read_text())["quantization_config"]["quant_method"] == "compressed-tensors"


def test_destination_rules(small, tmp_path):
    dst = tmp_path / "out"
    dst.mkdir()
    export.convert(small, dst)                            # an empty directory is fine
    marker = dst / "old.txt"
    marker.write_text("old")
    with pytest.raises(mmapload.OptionsError, match="already exists"):
        export.convert(small, dst)
    assert marker.exists()                                # untouched
    export.convert(small, dst, overwrite=True, granularity="block")
    assert not marker.exists()
    assert json.loads(read_header(dst / SHARDS[0]).metadata["mmapload"])["granularity"] == "block"
    f = tmp_path / "a_file"
    f.write_text("x")
    with pytest.raises(mmapload.OptionsError):
        export.convert(small, f)
    for bad in (small, small / "fp8", small.parent):
        with pytest.raises(mmapload.OptionsError, match="source"):
            export.convert(small, bad, overwrite=True)
    assert (small / SHARDS[0]).exists() and _no_partials(tmp_path) == []
    # overwrite replaces a checkpoint, a .safetensors file or a link; never other data or a device
    notes = tmp_path / "notes"
    (notes / "sub").mkdir(parents=True)
    (notes / "sub" / "thesis.tex").write_text("years of work")
    with pytest.raises(mmapload.OptionsError, match="holds no checkpoint"):
        export.convert(small, notes, overwrite=True)
    with pytest.raises(mmapload.OptionsError, match="holds no checkpoint"):
        export.convert(small, f, overwrite=True)
    assert (notes / "sub" / "thesis.tex").read_text() == "years of work" and f.read_text() == "x"
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(mmapload.OptionsError, match="not a folder or a file"):
        export.convert(small, fifo, overwrite=True)
    assert fifo.is_fifo() and _no_partials(tmp_path) == []
    one = tmp_path / "one.safetensors"
    one.write_bytes((small / SHARDS[0]).read_bytes())
    assert export.convert(small, one, overwrite=True).is_dir()


def test_bad_options_raise_before_anything_is_written(small, tmp_path):
    with pytest.raises(mmapload.OptionsError):
        export.convert(small, tmp_path / "out", granularity="row")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_corrupt_header_leaves_nothing(small, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for p in small.iterdir():
        if p.is_file():
            (src / p.name).write_bytes(p.read_bytes())
    raw = bytearray((src / SHARDS[1]).read_bytes())
    raw[20:24] = b"\xff\xfe{{"
    (src / SHARDS[1]).write_bytes(bytes(raw))
    with pytest.raises(mmapload.HeaderError, match=SHARDS[1]):
        export.convert(src, tmp_path / "out")
    assert not (tmp_path / "out").exists() and _no_partials(tmp_path) == []


def _copy_with_nan(small: Path, dst: Path) -> str:
    """A copy of ``small`` whose last quantized weight (in shard 2) starts with a NaN."""
    dst.mkdir()
    for p in small.iterdir():
        if p.is_file():
            (dst / p.name).write_bytes(p.read_bytes())
    policy = policy_for(open_checkpoint(dst), LoadOptions())
    spec = [s for s in read_header(dst / SHARDS[1]).tensors if policy(s)][-1]
    with open(dst / SHARDS[1], "r+b") as f:
        f.seek(spec.start)
        f.write(b"\xc0\x7f")                              # bf16 NaN
    return spec.name


def test_failure_mid_stream_removes_partial_and_keeps_old_dst(small, tmp_path, no_thread_leak):
    src = tmp_path / "src"
    bad_name = _copy_with_nan(small, src)
    with pytest.raises(mmapload.NonFiniteError, match=bad_name):
        export.convert(src, tmp_path / "out", ring_bytes=256 << 10)
    assert not (tmp_path / "out").exists() and _no_partials(tmp_path) == []
    old = tmp_path / "old"
    old.mkdir()
    (old / "keep.txt").write_text("previous output")
    (old / "config.json").write_text("{}")     # a checkpoint: what overwrite may replace
    with pytest.raises(mmapload.NonFiniteError):
        export.convert(src, old, overwrite=True)
    assert sorted(p.name for p in old.iterdir()) == ["config.json", "keep.txt"] and _no_partials(tmp_path) == []


def test_failed_final_rename_puts_the_old_dst_back(small, tmp_path, monkeypatch):
    old = tmp_path / "out"
    old.mkdir()
    (old / "keep.txt").write_text("previous output")
    (old / "model.safetensors.index.json").write_text("{}")
    real = os.rename

    def rename(a, b):
        if export.PARTIAL_MARK in str(a):
            raise OSError(28, "No space left on device")
        real(a, b)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(OSError, match="No space"):
        export.convert(small, old, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert sorted(p.name for p in old.iterdir()) == ["keep.txt", "model.safetensors.index.json"]


def test_keyboard_interrupt_mid_write_removes_partial(small, tmp_path, monkeypatch, no_thread_leak):
    real, calls = SafetensorsWriter.write, []

    def write(self, name, t):
        calls.append(name)
        if len(calls) == 30:
            assert any(tmp_path.glob(".out.mmapload-partial-*/.*.partial"))   # mid-way, really
            raise KeyboardInterrupt
        real(self, name, t)

    monkeypatch.setattr(SafetensorsWriter, "write", write)
    with pytest.raises(KeyboardInterrupt):
        export.convert(small, tmp_path / "out", ring_bytes=256 << 10)
    assert len(calls) == 30 and sorted(tmp_path.iterdir()) == []


@pytest.mark.parametrize("async_writeback", [True, False])
def test_written_data_is_synced_and_dropped_from_the_page_cache(small, tmp_path, monkeypatch, async_writeback):
    """Every window is on disk before it is dropped from the page cache, and the dropped ranges tile
    each file: with sync_file_range (the disk writes a window while the next is computed; it is
    waited for before the drop) and without it (fdatasync per window)."""
    import mmapload.writer as writer
    if async_writeback and writer._sfr is None:
        pytest.skip("no sync_file_range here")
    events = []   # ("wait", lo, hi) once a range is on disk; ("drop", lo, hi)
    real_sync, real_advise, real_sfr = os.fdatasync, os.posix_fadvise, writer._sfr
    monkeypatch.setattr(export, "SYNC_BYTES", 256 << 10)
    monkeypatch.setattr(os, "fdatasync", lambda fd: (events.append(("wait", 0, os.fstat(fd).st_size)),
                                                     real_sync(fd))[1])
    monkeypatch.setattr(os, "posix_fadvise", lambda fd, off, n, adv: (
        adv == os.POSIX_FADV_DONTNEED and events.append(("drop", off, off + n)), real_advise(fd, off, n, adv))[1])

    def sfr(fd, off, n, flags):
        rc = real_sfr(fd, off, n, flags)
        if flags & writer._WAIT_AFTER and rc == 0:
            events.append(("wait", off, off + n))
        return rc
    monkeypatch.setattr(writer, "_sfr", sfr if async_writeback else None)
    dst = export.convert(small, tmp_path / "out", drop_page_cache=False)   # reads advise nothing
    written = sum((dst / s).stat().st_size for s in SHARDS)
    dropped = [(lo, hi) for kind, lo, hi in events if kind == "drop"]
    # the dropped ranges tile each file from 0 to its end, in windows of about SYNC_BYTES
    assert sum(hi - lo for lo, hi in dropped) == written and all(hi - lo <= (256 << 10) + (1 << 20) for lo, hi in dropped)
    assert len(dropped) >= written // (256 << 10) - len(SHARDS)   # a file's last drop may take two windows
    for i, (kind, lo, hi) in enumerate(events):   # on disk before dropped
        if kind == "drop":
            assert any(k == "wait" and a <= lo and hi <= b for k, a, b in events[:i]), (lo, hi)


def test_writer_sync_bytes_writes_the_same_file(tmp_path):
    t = {"a": torch.randn(300, 70), "b": torch.arange(1000, dtype=torch.int16), "c": torch.tensor(3.0)}
    for sync in (0, 1000):
        entries = [(k, v.dtype, tuple(v.shape)) for k, v in t.items()]
        with SafetensorsWriter(tmp_path / f"{sync}.safetensors", entries, sync_bytes=sync) as w:
            for k, v in t.items():
                w.write(k, v)
        assert w.size == (tmp_path / f"{sync}.safetensors").stat().st_size
    assert (tmp_path / "0.safetensors").read_bytes() == (tmp_path / "1000.safetensors").read_bytes()


@pytest.fixture(scope="module")
def medium(tmp_path_factory):
    """~400 MiB: big enough that a conversion runs for a while after it starts writing."""
    return make_llama_checkpoint(tmp_path_factory.mktemp("medium") / "src", 400 << 20, shards=2)


def _tree_bytes(d: Path) -> int:
    try:
        return sum(p.stat().st_size for p in d.rglob("*") if p.is_file())
    except FileNotFoundError:   # a file renamed while we looked
        return 0


def test_sigkill_mid_conversion_leaves_nothing_complete_looking(medium, tmp_path):
    dst = tmp_path / "out"
    code = (f"from mmapload.converter import convert; convert({str(medium)!r}, {str(dst)!r}, "
            f"ring_bytes=1 << 20)")
    child = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT)
    partial = tmp_path / f".out.mmapload-partial-{child.pid}"
    deadline = time.monotonic() + 60
    while _tree_bytes(partial) < (8 << 20):
        assert child.poll() is None, f"convert exited ({child.returncode}) before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.002)
    child.send_signal(signal.SIGKILL)
    assert child.wait(timeout=30) == -signal.SIGKILL
    assert not dst.exists(), "a killed conversion left files at the destination"
    left = [p.name for p in tmp_path.iterdir()]
    assert left == [partial.name] and partial.name.startswith(".")   # hidden, named partial
    assert not (partial / INDEX_NAME).exists()
    # a later run removes the dead process's partial directory and writes a complete output
    export.convert(medium, dst, ring_bytes=16 << 20, granularity="block")
    assert sorted(p.name for p in dst.iterdir()) == sorted(SHARDS + [INDEX_NAME, "config.json"])
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_weights_in_other_formats_are_not_copied_and_a_lone_file_says_what_it_misses(small, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for p in small.iterdir():
        if p.is_file():
            (src / p.name).write_bytes(p.read_bytes())
    extras = ["pytorch_model.bin", "pytorch_model.bin.index.json", "tf_model.h5", "consolidated.00.pth",
              "tokenizer.json"]
    for name in extras:
        (src / name).write_bytes(b"high precision weights again")
    dst = export.convert(src, tmp_path / "out")
    copied = {p.name for p in dst.iterdir()}
    assert "tokenizer.json" in copied and not copied & set(extras[:-1]), copied
    # a shard given alone: the config.json beside it is not read, and a warning says so
    with pytest.warns(mmapload.MmapLoadWarning, match="without the config.json beside it"):
        model = mmapload.stream_quantize(src / SHARDS[0])
    assert "a file alone" in model.report.policy
