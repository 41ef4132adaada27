"""Tests for mmapload.checkpoint: shard discovery and header validation."""

from __future__ import annotations

import json
import math
import os
import struct

import pytest
import torch
import safetensors.torch as st_torch
from safetensors import safe_open
from safetensors.torch import save_file

import mmapload.header as ckmod   # read_header lives there (checkpoint re-exports it)
from mmapload.checkpoint import (
    MAX_HEADER_BYTES,
    Checkpoint,
    Shard,
    TensorSpec,
    open_checkpoint,
    read_header,
)
from mmapload.dtypes import DTYPES
from mmapload.errors import CheckpointError, FileChangedError, HeaderError, ShardIndexError

# ----------------------------------------------------------------------------- helpers


def raw_bytes(t: torch.Tensor) -> bytes:
    """The little-endian bytes safetensors stores for ``t``."""
    return t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def write_raw(path, header, data: bytes = b"", *, length: int | None = None, header_bytes: bytes | None = None):
    """Write ``u64 length + header JSON + data`` by hand; returns (path, data_start)."""
    hb = header_bytes if header_bytes is not None else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(hb) if length is None else length) + hb + data)
    return path, 8 + len(hb)


def entry(dtype, shape, begin, end):
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


def sample(dtype: torch.dtype, shape=(3, 5), seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.rand(shape, generator=g) > 0.5
    if dtype.is_floating_point and (dtype.itemsize > 1 or dtype in (torch.float8_e4m3fn, torch.float8_e5m2)):
        return (torch.randn(shape, generator=g) * 4).to(dtype)
    if dtype.is_floating_point or dtype.is_complex:   # E8M0, FNUZ, F4 (x2), C64: any bytes will do
        n = math.prod(shape) * dtype.itemsize
        return torch.randint(0, 256, (n,), generator=g, dtype=torch.uint8).view(dtype).reshape(shape)
    info = torch.iinfo(dtype)
    return torch.randint(max(info.min, -1000), min(info.max, 1000) + 1, shape, generator=g).to(dtype)


def assert_bytes_match(spec: TensorSpec, tensor: torch.Tensor):
    with open(spec.shard, "rb") as f:
        f.seek(spec.start)
        got = f.read(spec.end - spec.start)
    assert got == raw_bytes(tensor), spec.name


def write_index(folder, weight_map, **extra):
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": extra, "weight_map": weight_map}))


def make_sharded(folder, shards: dict[str, dict[str, torch.Tensor]], index=True):
    folder.mkdir(exist_ok=True)
    weight_map = {}
    for fname, tensors in shards.items():
        save_file(tensors, str(folder / fname))
        weight_map.update({name: fname for name in tensors})
    if index:
        write_index(folder, weight_map)
    return weight_map


@pytest.fixture
def three_shards():
    return {
        "model-00001-of-00003.safetensors": {"embed.weight": sample(torch.bfloat16, (16, 4), 1)},
        "model-00002-of-00003.safetensors": {
            "layers.0.w": sample(torch.float32, (8, 8), 2),
            "layers.0.b": sample(torch.float16, (8,), 3),
        },
        "model-00003-of-00003.safetensors": {
            "head.weight": sample(torch.float8_e4m3fn, (4, 8), 4),
            "head.mask": sample(torch.bool, (4,), 5),
        },
    }


def raises(exc, path, *fragments):
    """Context manager: ``exc`` raised, message names ``path``'s file and every fragment."""

    class _Check:
        def __enter__(self):
            self.cm = pytest.raises(exc)
            self.info = self.cm.__enter__()
            return self.info

        def __exit__(self, *args):
            handled = self.cm.__exit__(*args)
            msg = str(self.info.value)
            for fragment in ([path.name] if path is not None else []) + [str(f) for f in fragments]:
                assert fragment in msg, f"{fragment!r} not in {msg!r}"
            return handled

    return _Check()


# ----------------------------------------------------------------------------- valid files


def test_single_file_specs_match_file_bytes_and_safe_open(tmp_path):
    tensors = {
        "w": sample(torch.float32, (7, 3)),
        "b": sample(torch.bfloat16, (11,)),
        "ids": sample(torch.int64, (2, 2, 2)),
        "flags": sample(torch.bool, (5,)),
    }
    path = tmp_path / "m.safetensors"
    save_file(tensors, str(path))
    shard = read_header(path)
    assert {s.name for s in shard.tensors} == set(tensors)
    with safe_open(str(path), framework="pt") as f:
        for spec in shard.tensors:
            ref = tensors[spec.name]
            assert spec.shape == tuple(ref.shape) == tuple(f.get_slice(spec.name).get_shape())
            assert spec.dtype == f.get_slice(spec.name).get_dtype()
            assert spec.torch_dtype == ref.dtype
            assert spec.nbytes == ref.numel() * ref.element_size() == spec.numel * spec.itemsize
            assert_bytes_match(spec, ref)
            assert torch.equal(f.get_tensor(spec.name), ref)


@pytest.mark.parametrize("code", sorted(DTYPES))
def test_every_dtype_round_trips(tmp_path, code):
    dtype = DTYPES[code]
    t = sample(dtype, (4, 3), seed=len(code))
    path = tmp_path / f"{code}.safetensors"
    save_file({"t": t, "pad": torch.arange(3, dtype=torch.int16)}, str(path))
    spec = open_checkpoint(path)["t"]
    assert (spec.dtype, spec.torch_dtype, spec.torch_shape) == (code, dtype, (4, 3))   # F4: header [4, 6]
    assert spec.itemsize == t.element_size()
    with open(path, "rb") as f:
        f.seek(spec.start)
        back = torch.frombuffer(bytearray(f.read(spec.nbytes)), dtype=spec.torch_dtype)
    back = back.reshape(spec.torch_shape)
    assert torch.equal(back.view(torch.uint8), t.view(torch.uint8))


def test_dtype_table_is_exactly_the_supported_set():
    # every dtype safetensors.torch reads and writes in this torch, as it names them
    # (F6_E2M3 / F6_E3M2 travel as bytes, names and bits against safetensors' writer: test_dtypes.py)
    assert set(DTYPES.values()) == {d for d in st_torch._SIZE if d is not None}
    assert all(DTYPES[name] is d for name, d in st_torch._TYPES.items() if d is not None)
    assert MAX_HEADER_BYTES == 100_000_000   # safetensors' MAX_HEADER_SIZE


def test_zero_size_and_scalar_tensors(tmp_path):
    tensors = {
        "empty": torch.zeros(0, dtype=torch.float32),
        "empty2d": torch.zeros(3, 0, dtype=torch.bfloat16),
        "scalar": torch.tensor(2.5, dtype=torch.float64),
        "scalar_bool": torch.tensor(True),
        "x": sample(torch.int8, (5,)),
    }
    path = tmp_path / "z.safetensors"
    save_file(tensors, str(path))
    ck = open_checkpoint(path)
    assert (ck["empty"].shape, ck["empty"].numel, ck["empty"].nbytes) == ((0,), 0, 0)
    assert (ck["empty2d"].shape, ck["empty2d"].numel, ck["empty2d"].nbytes) == ((3, 0), 0, 0)
    assert (ck["scalar"].shape, ck["scalar"].numel, ck["scalar"].nbytes) == ((), 1, 8)
    assert (ck["scalar_bool"].shape, ck["scalar_bool"].nbytes) == ((), 1)
    for name, t in tensors.items():
        assert_bytes_match(ck[name], t)
    assert ck.total_bytes == 8 + 1 + 5


def test_hand_built_zero_size_tensors_may_share_an_offset(tmp_path):
    header = {"a": entry("F32", [0], 0, 0), "b": entry("F32", [2], 0, 8), "c": entry("I8", [0, 4], 8, 8),
              "d": entry("U8", [], 8, 9), "e": entry("BF16", [0], 0, 0)}
    path, ds = write_raw(tmp_path / "zs.safetensors", header, bytes(9))
    shard = read_header(path)
    assert [s.name for s in shard.tensors] == ["a", "e", "b", "c", "d"]
    assert [(s.start - ds, s.end - ds) for s in shard.tensors] == [(0, 0), (0, 0), (0, 8), (8, 8), (8, 9)]


def test_metadata_round_trips_and_defaults_to_empty(tmp_path):
    p1, p2 = tmp_path / "m1.safetensors", tmp_path / "m2.safetensors"
    save_file({"a": torch.ones(2)}, str(p1), metadata={"format": "pt", "note": "héllo"})
    save_file({"a": torch.ones(2)}, str(p2))
    assert read_header(p1).metadata == {"format": "pt", "note": "héllo"}
    assert read_header(p2).metadata == {}
    p3, _ = write_raw(tmp_path / "m3.safetensors", {"__metadata__": None, "a": entry("U8", [1], 0, 1)}, b"\x07")
    assert read_header(p3).metadata == {}
    assert "__metadata__" not in open_checkpoint(p1)


def test_shard_fields_and_absolute_offsets(tmp_path):
    path = tmp_path / "s.safetensors"
    save_file({"a": torch.ones(3, 3), "b": torch.zeros(4, dtype=torch.int16)}, str(path))
    raw = path.read_bytes()
    header_len = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + header_len])
    shard = read_header(str(path))
    assert shard.path == path.resolve()
    assert shard.data_start == 8 + header_len
    assert shard.file_size == len(raw) == os.path.getsize(path)
    for spec in shard.tensors:
        begin, end = header[spec.name]["data_offsets"]
        assert (spec.start, spec.end) == (8 + header_len + begin, 8 + header_len + end)
        assert spec.shard == path.resolve()
    starts = [s.start for s in shard.tensors]
    assert starts == sorted(starts)
    assert shard.tensors[-1].end == shard.file_size


def test_tensors_are_in_file_order_not_header_order(tmp_path):
    header = {"z_first": entry("F32", [1], 0, 4), "a_last": entry("F32", [2], 12, 20),
              "m_mid": entry("I16", [4], 4, 12)}
    path, ds = write_raw(tmp_path / "o.safetensors", header, bytes(range(20)))
    shard = read_header(path)
    assert [s.name for s in shard.tensors] == ["z_first", "m_mid", "a_last"]
    assert open_checkpoint(path)["a_last"].start == ds + 12


def test_reads_only_the_header_never_the_data(tmp_path, monkeypatch):
    path = tmp_path / "big.safetensors"
    save_file({"a": torch.ones(64, 64), "b": torch.ones(1000, dtype=torch.float64)}, str(path))
    header_len = struct.unpack("<Q", path.read_bytes()[:8])[0]
    read_sizes = []
    real_open, real_read, real_pread = open, os.read, os.pread

    class CountingFile:
        def __init__(self, f):
            self._f = f

        def __enter__(self):
            return self

        def __exit__(self, *args):
            self._f.close()

        def read(self, n=-1):
            data = self._f.read(n)
            read_sizes.append(len(data))
            return data

        def __getattr__(self, name):
            return getattr(self._f, name)

    monkeypatch.setattr(ckmod, "open", lambda *a, **k: CountingFile(real_open(*a, **k)), raising=False)
    monkeypatch.setattr(os, "read", lambda fd, n: read_sizes.append(n) or real_read(fd, n))
    monkeypatch.setattr(os, "pread", lambda fd, n, off: read_sizes.append(n) or real_pread(fd, n, off))
    shard = read_header(path)
    assert sum(read_sizes) == 8 + header_len
    assert shard.file_size - shard.data_start == 64 * 64 * 4 + 1000 * 8


def test_python_ints_do_not_overflow(tmp_path):
    huge = 2**68
    path, ds = write_raw(tmp_path / "huge.safetensors", {"h": entry("F32", [huge], 0, huge * 4)})
    with raises(HeaderError, path, "'h'", f"[{ds}, {ds + huge * 4})", "is truncated", f"expected size {ds + huge * 4}"):
        read_header(path)


def test_non_safetensors_suffix_is_accepted(tmp_path):
    path = tmp_path / "weights.bin"
    save_file({"a": torch.arange(6, dtype=torch.int32)}, str(path))
    ck = open_checkpoint(path)
    assert ck.root == path.resolve() and len(ck.shards) == 1
    assert_bytes_match(ck["a"], torch.arange(6, dtype=torch.int32))


def test_checkpoint_accessors(tmp_path):
    tensors = {"small": torch.ones(2), "large": torch.ones(10, 10), "mid": torch.ones(5, dtype=torch.float64)}
    path = tmp_path / "acc.safetensors"
    save_file(tensors, str(path))
    ck = open_checkpoint(path)
    assert isinstance(ck, Checkpoint) and isinstance(ck.shards[0], Shard)
    assert ck.total_bytes == 8 + 400 + 40
    assert ck.largest.name == "large"
    assert ck.tensors == ck.shards[0].tensors
    assert ck["mid"].dtype == "F64" and ck.get("mid") is ck["mid"]
    assert ck.get("nope") is None and ck.get("nope", ck["small"]) is ck["small"]
    assert "small" in ck and "nope" not in ck
    with pytest.raises(KeyError, match="nope"):
        ck["nope"]
    with pytest.raises(AttributeError):   # specs are immutable
        ck["small"].start = 0
    hash(ck.shards[0])  # frozen dataclasses with a dict field must still hash


def test_empty_header_gives_empty_checkpoint(tmp_path):
    path, _ = write_raw(tmp_path / "e.safetensors", {"__metadata__": {"a": "b"}})
    ck = open_checkpoint(path)
    assert ck.tensors == () and ck.total_bytes == 0 and ck.largest is None
    assert ck.shards[0].metadata == {"a": "b"}


def test_relative_path_is_resolved(tmp_path, monkeypatch):
    save_file({"a": torch.ones(1)}, str(tmp_path / "r.safetensors"))
    monkeypatch.chdir(tmp_path)
    ck = open_checkpoint("r.safetensors")
    assert ck.root == tmp_path.resolve() / "r.safetensors"
    assert ck["a"].shard.is_absolute()


# ----------------------------------------------------------------------------- folder layouts


def test_folder_with_index(tmp_path, three_shards):
    folder = tmp_path / "ck"
    weight_map = make_sharded(folder, three_shards)
    # index order deliberately differs from file-name order: load order is still by file name
    write_index(folder, dict(reversed(list(weight_map.items()))), total_size=0)
    ck = open_checkpoint(folder)
    assert ck.root == folder.resolve()
    assert [s.path.name for s in ck.shards] == sorted(three_shards)
    expected = [n for f in sorted(three_shards) for n in sorted(three_shards[f], key=lambda n: ck[n].start)]
    assert [s.name for s in ck.tensors] == expected
    for fname, tensors in three_shards.items():
        for name, t in tensors.items():
            assert ck[name].shard == (folder / fname).resolve()
            assert_bytes_match(ck[name], t)
    assert ck.total_bytes == sum(t.numel() * t.element_size() for ts in three_shards.values() for t in ts.values())
    assert ck.largest.name == "layers.0.w"


def test_folder_with_index_ignores_unlisted_files(tmp_path, three_shards):
    folder = tmp_path / "ck"
    make_sharded(folder, three_shards)
    save_file({"embed.weight": torch.ones(1)}, str(folder / "consolidated.safetensors"))  # would duplicate
    ck = open_checkpoint(folder)
    assert len(ck.shards) == 3 and ck["embed.weight"].shape == (16, 4)


def test_folder_without_index_sorted_and_not_recursive(tmp_path):
    folder = tmp_path / "ck"
    folder.mkdir()
    save_file({"b1": torch.ones(2)}, str(folder / "bb.safetensors"))
    save_file({"a1": torch.ones(3), "a2": torch.zeros(1)}, str(folder / "a.safetensors"))
    save_file({"c1": torch.ones(4)}, str(folder / "c.safetensors"))
    (folder / "notes.txt").write_text("not a shard")
    (folder / "sub").mkdir()
    save_file({"a1": torch.ones(1)}, str(folder / "sub" / "x.safetensors"))  # a duplicate if recursed
    (folder / "dir.safetensors").mkdir()  # a folder with the suffix is not a shard
    ck = open_checkpoint(folder)
    assert [s.path.name for s in ck.shards] == ["a.safetensors", "bb.safetensors", "c.safetensors"]
    assert [s.name for s in ck.tensors][-2:] == ["b1", "c1"]
    assert ck["a1"].shard.name == "a.safetensors"


def test_folder_with_single_model_safetensors(tmp_path):
    folder = tmp_path / "ck"
    folder.mkdir()
    t = sample(torch.float16, (6, 2))
    save_file({"w": t}, str(folder / "model.safetensors"))
    ck = open_checkpoint(str(folder))
    assert [s.path for s in ck.shards] == [(folder / "model.safetensors").resolve()]
    assert_bytes_match(ck["w"], t)


# ----------------------------------------------------------------------------- discovery errors


def test_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError):
        open_checkpoint(tmp_path / "nope")
    with pytest.raises(FileNotFoundError):
        read_header(tmp_path / "nope.safetensors")


def test_a_directory_is_no_shard(tmp_path):
    # refused before open() (issue 13: only regular files are opened as shards)
    with raises(CheckpointError, tmp_path, "is a directory, not a regular file"):
        read_header(tmp_path)


def test_folder_without_shards(tmp_path):
    (tmp_path / "readme.md").write_text("hi")
    with raises(CheckpointError, tmp_path, "*.safetensors"):
        open_checkpoint(tmp_path)


def test_duplicate_tensor_across_shards_without_index(tmp_path):
    folder = tmp_path / "ck"
    make_sharded(folder, {"a.safetensors": {"w": torch.ones(2)}, "b.safetensors": {"v": torch.ones(1),
                                                                                   "w": torch.ones(3)}}, index=False)
    with raises(ShardIndexError, folder / "a.safetensors", "b.safetensors", "'w'", "twice"):
        open_checkpoint(folder)


def test_duplicate_tensor_across_shards_with_index(tmp_path):
    folder = tmp_path / "ck"
    make_sharded(folder, {"a.safetensors": {"w": torch.ones(2)}, "b.safetensors": {"w": torch.ones(3)}})
    write_index(folder, {"w": "a.safetensors", "x": "b.safetensors"})
    with raises(ShardIndexError, folder / "a.safetensors", "b.safetensors", "'w'"):
        open_checkpoint(folder)


def test_header_error_in_one_shard_names_that_shard(tmp_path, three_shards):
    folder = tmp_path / "ck"
    make_sharded(folder, three_shards)
    bad = folder / "model-00002-of-00003.safetensors"
    bad.write_bytes(bad.read_bytes()[:-1])
    with raises(HeaderError, bad, "truncated"):
        open_checkpoint(folder)


# ----------------------------------------------------------------------------- index errors


@pytest.mark.parametrize("text", [b"{not json", b"\xff\xfe", b"[1, 2]", b'{"metadata": {}}', b'{"weight_map": []}',
                                  b'{"weight_map": {}}', b'{"weight_map": {"w": 5}}', b'{"weight_map": {"w": ""}}',
                                  b"[" * 100_000 + b"]" * 100_000])
def test_index_malformed(tmp_path, text):
    folder = tmp_path / "ck"
    make_sharded(folder, {"x.safetensors": {"w": torch.ones(1)}})
    index = folder / "model.safetensors.index.json"
    index.write_bytes(text)
    with raises(ShardIndexError, index):
        open_checkpoint(folder)


@pytest.mark.parametrize("absolute", [True, False])
def test_index_shard_outside_the_folder(tmp_path, absolute):
    folder = tmp_path / "ck"
    make_sharded(folder, {"x.safetensors": {"v": torch.ones(1)}})
    outside = tmp_path / "x.safetensors"  # a valid shard, but not in the checkpoint folder
    save_file({"w": torch.ones(1)}, str(outside))
    target = str(outside) if absolute else "../x.safetensors"
    write_index(folder, {"v": "x.safetensors", "w": target})
    with raises(ShardIndexError, folder / "model.safetensors.index.json", "'w'", repr(target)):
        open_checkpoint(folder)


def test_index_names_missing_shard(tmp_path, three_shards):
    folder = tmp_path / "ck"
    make_sharded(folder, three_shards)
    (folder / "model-00003-of-00003.safetensors").unlink()
    with raises(ShardIndexError, folder / "model.safetensors.index.json", "model-00003-of-00003.safetensors",
                "missing"):
        open_checkpoint(folder)


def test_index_maps_tensor_the_shard_lacks(tmp_path, three_shards):
    folder = tmp_path / "ck"
    weight_map = make_sharded(folder, three_shards)
    write_index(folder, {**weight_map, "ghost.weight": "model-00001-of-00003.safetensors"})
    with raises(ShardIndexError, folder / "model.safetensors.index.json", "'ghost.weight'",
                "model-00001-of-00003.safetensors", "does not contain"):
        open_checkpoint(folder)


def test_index_maps_tensor_to_the_wrong_shard(tmp_path, three_shards):
    folder = tmp_path / "ck"
    weight_map = make_sharded(folder, three_shards)
    write_index(folder, {**weight_map, "layers.0.b": "model-00001-of-00003.safetensors"})
    ck_start = read_header(folder / "model-00002-of-00003.safetensors")
    spec = next(s for s in ck_start.tensors if s.name == "layers.0.b")
    with raises(ShardIndexError, folder / "model.safetensors.index.json", "'layers.0.b'",
                "model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors", f"[{spec.start}, {spec.end})"):
        open_checkpoint(folder)


def test_index_incomplete(tmp_path, three_shards):
    folder = tmp_path / "ck"
    weight_map = make_sharded(folder, three_shards)
    del weight_map["head.mask"]
    write_index(folder, weight_map)
    with raises(ShardIndexError, folder / "model.safetensors.index.json", "'head.mask'",
                "model-00003-of-00003.safetensors", "absent from weight_map"):
        open_checkpoint(folder)


# ----------------------------------------------------------------------------- header errors


@pytest.mark.parametrize("size", [0, 1, 7])
def test_file_too_short(tmp_path, size):
    path = tmp_path / "short.safetensors"
    path.write_bytes(b"\x01" * size)
    with raises(HeaderError, path, f"{size} bytes"):
        read_header(path)


def test_header_length_over_limit(tmp_path):
    path, _ = write_raw(tmp_path / "big.safetensors", {}, length=MAX_HEADER_BYTES + 1)
    with raises(HeaderError, path, MAX_HEADER_BYTES + 1, "[0, 8)"):
        read_header(path)


@pytest.mark.parametrize("length", [MAX_HEADER_BYTES, MAX_HEADER_BYTES + 8])
def test_header_cap_is_safetensors(tmp_path, length):
    """A header of exactly the cap loads in both libraries; 8 bytes more is refused by both."""
    from safetensors import safe_open
    path = tmp_path / "cap.safetensors"
    with open(path, "wb") as f:
        f.write(length.to_bytes(8, "little") + b"{}")
        f.write(b" " * (length - 2))
    if length <= MAX_HEADER_BYTES:
        assert read_header(path).tensors == ()
        with safe_open(path, "pt") as f:
            assert list(f.keys()) == []
    else:
        with raises(HeaderError, path, length, "[0, 8)"):
            read_header(path)
        with pytest.raises(Exception, match="header too large"):
            safe_open(path, "pt")


def test_header_length_past_eof(tmp_path):
    path, _ = write_raw(tmp_path / "cut.safetensors", {}, length=1000)
    with raises(HeaderError, path, "[8, 1008)", f"{path.stat().st_size} bytes"):
        read_header(path)


@pytest.mark.parametrize("header_bytes, fragment", [
    (b'{"a\xff": 1}', "offset 11"),           # invalid UTF-8 at header byte 3
    (b'{"a": ', "not valid JSON"),
    (b"", "not valid JSON"),
    (b'{"a": {"dtype": "F32"}, "a": {}}', "'a' appears twice"),
    (b'{"a": {"dtype": "F32", "dtype": "F16", "shape": [], "data_offsets": [0, 4]}}', "'dtype' appears twice"),
    (b'{"a": ' + b"1" * 5000 + b"}", "not valid JSON"),   # int too long for Python's str->int limit
    (b"[" * 200_000 + b"]" * 200_000, "not valid JSON"),   # nesting deeper than the recursion limit
    (b"[]", "JSON list"),
    (b'"text"', "JSON str"),
    (b"42", "JSON int"),
])
def test_header_not_json_object(tmp_path, header_bytes, fragment):
    path, ds = write_raw(tmp_path / "bad.safetensors", None, header_bytes=header_bytes)
    with raises(HeaderError, path, fragment, f"[8, {ds})"):
        read_header(path)


@pytest.mark.parametrize("meta", [{"k": 1}, {"k": None}, {"k": ["a"]}, ["a"], "text", 3])
def test_metadata_must_be_str_to_str(tmp_path, meta):
    path, _ = write_raw(tmp_path / "meta.safetensors", {"__metadata__": meta, "a": entry("U8", [1], 0, 1)}, b"\0")
    with raises(HeaderError, path, "__metadata__"):
        read_header(path)


@pytest.mark.parametrize("bad", [
    5, "x", None, [1, 2],
    {"dtype": "F32", "shape": [1]},                                           # missing key
])   # an extra key is accepted, as safetensors does (tests/test_hostile_convert.py)
def test_entry_must_be_object_with_the_required_keys(tmp_path, bad):
    path, _ = write_raw(tmp_path / "entry.safetensors", {"good": entry("U8", [1], 0, 1), "the.bad": bad}, b"\0")
    with raises(HeaderError, path, "'the.bad'", "data_offsets"):
        read_header(path)


@pytest.mark.parametrize("dtype", ["F4_E2M1", "bf16", "U128", "C32", 5, None])
def test_unknown_dtype_lists_known_ones(tmp_path, dtype):
    path, _ = write_raw(tmp_path / "dt.safetensors", {"w.q": entry(dtype, [1], 0, 4)}, bytes(4))
    with raises(HeaderError, path, "'w.q'", repr(dtype), *DTYPES):
        read_header(path)


@pytest.mark.parametrize("shape", [[-1], [1.0], [True], ["3"], 3, None, [[2]], {"a": 1}])
def test_bad_shape(tmp_path, shape):
    path, _ = write_raw(tmp_path / "sh.safetensors", {"w.s": entry("U8", shape, 0, 1)}, b"\0")
    with raises(HeaderError, path, "'w.s'", "shape", repr(shape)):
        read_header(path)


@pytest.mark.parametrize("offsets", [[0], [0, 1, 2], [-1, 0], [0, 1.0], [True, 1], "0,1", None, [0, None]])
def test_bad_data_offsets(tmp_path, offsets):
    header = {"w.o": {"dtype": "U8", "shape": [1], "data_offsets": offsets}}
    path, _ = write_raw(tmp_path / "off.safetensors", header, b"\0")
    with raises(HeaderError, path, "'w.o'", "data_offsets", repr(offsets)):
        read_header(path)


def test_data_offsets_reversed(tmp_path):
    path, ds = write_raw(tmp_path / "rev.safetensors", {"w.r": entry("U8", [0], 4, 0)}, bytes(4))
    with raises(HeaderError, path, "'w.r'", "[4, 0]", f"[{ds + 4}, {ds})", "end before"):
        read_header(path)


@pytest.mark.parametrize("dtype, shape, end, need", [("F32", [2], 4, 8), ("BF16", [3, 2], 13, 12),
                                                     ("F64", [], 4, 8), ("BOOL", [0], 1, 0)])
def test_size_mismatch(tmp_path, dtype, shape, end, need):
    path, ds = write_raw(tmp_path / "sz.safetensors", {"w.n": entry(dtype, shape, 0, end)}, bytes(end))
    with raises(HeaderError, path, "'w.n'", f"needs {need} bytes", f"[0, {end}]", f"[{ds}, {ds + end})"):
        read_header(path)


def test_hole_at_start_of_data(tmp_path):
    path, ds = write_raw(tmp_path / "h0.safetensors", {"w.h": entry("F32", [1], 4, 8)}, bytes(8))
    with raises(HeaderError, path, "'w.h'", "hole of 4 bytes", f"[{ds}, {ds + 4})", "start of the data"):
        read_header(path)


def test_hole_between_tensors(tmp_path):
    header = {"first": entry("F32", [1], 0, 4), "second": entry("F32", [1], 6, 10)}
    path, ds = write_raw(tmp_path / "gap.safetensors", header, bytes(10))
    with raises(HeaderError, path, "'second'", "'first'", "hole of 2 bytes", f"[{ds + 4}, {ds + 6})"):
        read_header(path)


def test_overlapping_tensors(tmp_path):
    header = {"first": entry("F32", [2], 0, 8), "second": entry("F32", [1], 4, 8)}
    path, ds = write_raw(tmp_path / "ovl.safetensors", header, bytes(8))
    with raises(HeaderError, path, "'second'", "overlaps", "'first'", f"[{ds}, {ds + 8})", f"[{ds + 4}, {ds + 8})"):
        read_header(path)


def test_truncated_file(tmp_path):
    path = tmp_path / "trunc.safetensors"
    save_file({"a": torch.ones(4), "z.last": torch.ones(8)}, str(path))
    full = path.stat().st_size
    path.write_bytes(path.read_bytes()[:-3])
    spec_end = full  # the last tensor ends at the original end of file
    with raises(HeaderError, path, "'z.last'", "truncated", f"expected size {full}", f"actual size {full - 3}",
                f", {spec_end})"):
        read_header(path)


def test_trailing_bytes(tmp_path):
    path = tmp_path / "trail.safetensors"
    save_file({"a": torch.ones(4), "z.last": torch.ones(8)}, str(path))
    full = path.stat().st_size
    with open(path, "ab") as f:
        f.write(b"junk!")
    with raises(HeaderError, path, "'z.last'", "5 trailing bytes", f"expected size {full}", f"actual size {full + 5}"):
        read_header(path)


def test_trailing_bytes_after_empty_header(tmp_path):
    path, ds = write_raw(tmp_path / "t0.safetensors", {}, b"xyz")
    with raises(HeaderError, path, "3 trailing bytes", f"expected size {ds}", f"actual size {ds + 3}"):
        read_header(path)


def test_file_shrinking_during_header_read(tmp_path, monkeypatch):
    path = tmp_path / "shrink.safetensors"
    save_file({"a": torch.ones(4)}, str(path))
    header_len = struct.unpack("<Q", path.read_bytes()[:8])[0]
    real_open = open

    class ShortRead:  # simulates the file being truncated between fstat and the header read
        def __init__(self, f):
            self._f = f

        def __enter__(self):
            return self

        def __exit__(self, *args):
            self._f.close()

        def read(self, n=-1):
            return self._f.read(n)[: max(n // 2, 8)]

        def __getattr__(self, name):
            return getattr(self._f, name)

    monkeypatch.setattr(ckmod, "open", lambda *a, **k: ShortRead(real_open(*a, **k)), raising=False)
    with raises(FileChangedError, path, f"[8, {8 + header_len})", f"got {header_len // 2} bytes"):
        read_header(path)


def test_the_index_file_itself_opens_its_folder(tmp_path):
    """A path to ``model.safetensors.index.json`` (what the verbs' docstrings call a sharded
    index) opens the same checkpoint as its folder; any other JSON file is still no safetensors."""
    import json
    from safetensors.torch import save_file
    save_file({"a": torch.ones(2)}, tmp_path / "model-00001-of-00002.safetensors")
    save_file({"b": torch.zeros(3)}, tmp_path / "model-00002-of-00002.safetensors")
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    by_index = open_checkpoint(tmp_path / "model.safetensors.index.json")
    by_folder = open_checkpoint(tmp_path)
    assert by_index.root == by_folder.root == tmp_path.resolve()
    assert [s.name for s in by_index.tensors] == [s.name for s in by_folder.tensors] == ["a", "b"]
    (tmp_path / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
    with pytest.raises(HeaderError, match="not a safetensors file"):
        open_checkpoint(tmp_path / "config.json")


def test_a_missing_checkpoint_is_typed_and_still_a_file_not_found(tmp_path):
    from mmapload import CheckpointNotFoundError, MmapLoadError, stream_quantize
    with pytest.raises(CheckpointNotFoundError, match="no such file or folder") as e:
        stream_quantize(tmp_path / "nope")
    assert isinstance(e.value, MmapLoadError) and isinstance(e.value, FileNotFoundError)
    assert str(tmp_path / "nope") in str(e.value)
