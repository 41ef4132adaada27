"""Every dtype the safetensors format defines passes through bit for bit (issue 12).

Files are hand-built (header JSON written here): safetensors' own writer cannot make F6 at all.
Each holds one tensor per dtype next to a bf16 weight that is quantized; streamed with every
io mode and converted, each comes out with its bytes, dtype and shape, and the weight as FP8.
"""

import json
import math

import numpy as np
import pytest
import torch
import safetensors.torch as st_torch
from safetensors import safe_open

from mmapload import convert, iter_quantized, stream_quantize
from mmapload.checkpoint import open_checkpoint, read_header
from mmapload.dtypes import BITS, DTYPES, FLOATS, FP8, WIDE_FLOATS, dtype_name, torch_dtype_of, torch_shape
from mmapload.fp8 import FP8_DTYPES
from mmapload.errors import HeaderError
from mmapload.estimate import estimate
from mmapload.result import QuantizedTensor
from mmapload.writer import SafetensorsWriter

# safetensors' Rust ``Dtype`` enum (safetensors/src/tensor.rs), in its order
FORMAT_DTYPES = ["BOOL", "F4", "F6_E2M3", "F6_E3M2", "U8", "I8", "F8_E5M2", "F8_E4M3", "F8_E8M0",
                 "F8_E4M3FNUZ", "F8_E5M2FNUZ", "I16", "U16", "F16", "BF16", "I32", "U32", "F32", "C64",
                 "F64", "I64", "U64"]


def _named_by_safetensors() -> dict[str, tuple[torch.dtype, int]]:
    """safetensors' own word, not our table: for every torch dtype safetensors.torch saves (its
    ``_SIZE``), the name and bits per element its writer puts in the header it writes."""
    out = {}
    for dtype in (d for d in st_torch._SIZE if d is not None):
        t = torch.zeros(2, 4, dtype=torch.uint8).view(dtype) if dtype.itemsize == 1 else torch.zeros(2, 4, dtype=dtype)
        raw = st_torch.save({"t": t})
        entry = json.loads(raw[8:8 + int.from_bytes(raw[:8], "little")])["t"]
        lo, hi = entry["data_offsets"]
        out[entry["dtype"]] = (dtype, (hi - lo) * 8 // math.prod(entry["shape"]))
    return out


SAFETENSORS_NAMES = _named_by_safetensors()   # "F4" -> (torch.float4_e2m1fn_x2, 4), ...
WEIGHT = "layer.weight"   # bf16 [64, 32]: quantized
IO_MODES = ["mmap", "pread", "direct", "view"]


def _random_bytes(n: int, seed: int) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


def write_file(path, tensors: list[tuple[str, str, list[int], bytes]]) -> None:
    """A safetensors file holding ``(name, dtype, shape, data)`` in that order, header by hand."""
    header, offset = {}, 0
    for name, dtype, shape, data in tensors:
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + b"".join(t[3] for t in tensors))


def _cases() -> list[tuple[str, str, list[int]]]:
    """One [3, 8] tensor per dtype, plus shapes that stress the byte arithmetic: sub-byte
    tensors whose last dim holds no whole byte, a big sub-byte tensor cut over several ring
    slots, a scalar, an empty one."""
    cases = [(f"x.{d.lower()}", d, [3, 8]) for d in FORMAT_DTYPES]
    cases += [("odd.f4", "F4", [2, 3]), ("odd.f6", "F6_E2M3", [2, 2]), ("flat.f6", "F6_E3M2", [4]),
              ("big.f6", "F6_E2M3", [40, 512]), ("big.f4", "F4", [64, 520]), ("big.u16", "U16", [5, 3001]),
              ("scalar.u64", "U64", []), ("empty.f6", "F6_E3M2", [0, 3]), ("empty.c64", "C64", [2, 0])]
    return cases


@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory):
    """A folder with one shard: the bf16 weight between every dtype's tensors."""
    d = tmp_path_factory.mktemp("dtypes")
    w = torch.randn(64, 32, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    tensors = [(name, dtype, shape, _random_bytes(math.prod(shape) * BITS[dtype] // 8, i))
               for i, (name, dtype, shape) in enumerate(_cases())]
    tensors.insert(len(tensors) // 2, (WEIGHT, "BF16", [64, 32], w.view(torch.uint8).numpy().tobytes()))
    write_file(d / "model.safetensors", tensors)
    return d


def _source(ckpt_dir) -> dict[str, tuple[str, list[int], bytes]]:
    path = ckpt_dir / "model.safetensors"
    raw = path.read_bytes()
    return {s.name: (s.dtype, list(s.shape), raw[s.start:s.end]) for s in read_header(path).tensors}


def _expected_torch(dtype: str, shape: list[int]) -> tuple[torch.dtype, tuple[int, ...]]:
    """What a tensor comes out as: the dtype safetensors gives it in this torch, else bytes;
    the shape rule (torch_shape) is pinned by test_the_shapes_tensors_come_out_as."""
    return SAFETENSORS_NAMES.get(dtype, (torch.uint8,))[0], torch_shape(dtype, shape)


def _bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _check_passthrough(name: str, t: torch.Tensor, dtype: str, shape: list[int], data: bytes) -> None:
    want_dtype, want_shape = _expected_torch(dtype, shape)
    assert isinstance(t, torch.Tensor) and not isinstance(t, QuantizedTensor), name
    assert t.dtype == want_dtype, (name, t.dtype, want_dtype)
    assert tuple(t.shape) == want_shape, (name, tuple(t.shape), want_shape)
    assert _bytes(t) == data, name


def test_the_table_is_every_format_dtype_with_what_torch_has():
    assert list(BITS) == FORMAT_DTYPES
    assert BITS["F6_E2M3"] == BITS["F6_E3M2"] == 6   # no torch dtype, so safetensors cannot say
    # names, torch dtypes and bits exactly as safetensors' writer gives them, in this torch
    assert DTYPES == {name: dtype for name, (dtype, _) in SAFETENSORS_NAMES.items()}
    assert {name: BITS[name] for name in DTYPES} == {name: bits for name, (_, bits) in SAFETENSORS_NAMES.items()}
    # and as safetensors' torch.py reads them (_TYPES lacks F4 / F8_E8M0, read by its Rust side)
    assert all(DTYPES[name] is dtype for name, dtype in st_torch._TYPES.items() if dtype is not None)
    assert all(dtype_name(dtype) == name and torch_dtype_of(name) is dtype for name, dtype in DTYPES.items())
    assert torch_dtype_of("F6_E2M3") is torch.uint8


def test_the_kinds_other_modules_derive_come_from_torch():
    assert FLOATS == {n for n, d in DTYPES.items() if d.is_floating_point}
    assert FP8 == {dtype_name(d) for d in FP8_DTYPES} == {"F8_E4M3", "F8_E5M2"}   # what fp8.py computes with
    assert WIDE_FLOATS == {n for n, d in DTYPES.items() if d.is_floating_point and d.itemsize > 1}
    assert WIDE_FLOATS == {"F16", "BF16", "F32", "F64"}


def test_the_shapes_tensors_come_out_as():
    assert torch_shape("F4", [4096, 2880]) == (4096, 1440)   # as safetensors.safe_open gives it
    assert torch_shape("F4", [2, 3]) == (3,)                  # last dim holds no whole byte: 1-D
    assert torch_shape("F6_E2M3", [64, 32]) == (64, 24)       # raw bytes
    assert torch_shape("F6_E3M2", [2, 2]) == (3,)
    assert torch_shape("U16", [3, 8]) == (3, 8) and torch_shape("C64", []) == ()


@pytest.mark.parametrize("io", IO_MODES)
def test_stream_passes_every_dtype_bit_for_bit(ckpt_dir, io, no_thread_leak):
    src = _source(ckpt_dir)
    # 16 KiB ring, 4 KiB slots: the big tensors are cut into pieces
    names = [n for n, _ in iter_quantized(ckpt_dir, "cpu", io=io, ring_bytes=16 << 10)]
    assert names == list(src)
    model = stream_quantize(ckpt_dir, "cpu", io=io, ring_bytes=16 << 10)
    assert model.report.quantized == 1
    w = model[WEIGHT]
    assert isinstance(w, QuantizedTensor) and w.data.dtype == torch.float8_e4m3fn and w.shape == (64, 32)
    for name, (dtype, shape, data) in src.items():
        if name != WEIGHT:
            _check_passthrough(name, model[name], dtype, shape, data)


def test_stream_agrees_with_safetensors_where_it_reads_the_dtype(ckpt_dir):
    model = stream_quantize(ckpt_dir, "cpu", ring_bytes=16 << 10)
    with safe_open(str(ckpt_dir / "model.safetensors"), "pt") as f:
        for spec in open_checkpoint(ckpt_dir).tensors:
            if spec.name == WEIGHT or spec.raw or (spec.dtype == "F4" and spec.shape[-1] % 2):
                continue   # safetensors has no torch dtype for F6 and refuses an odd F4 last dim
            ref = f.get_tensor(spec.name)
            assert (model[spec.name].dtype, model[spec.name].shape) == (ref.dtype, ref.shape), spec.name
            assert _bytes(model[spec.name]) == _bytes(ref), spec.name


def test_convert_writes_every_dtype_back_as_it_was(ckpt_dir, tmp_path, no_thread_leak):
    src = _source(ckpt_dir)
    dst = convert(ckpt_dir, tmp_path / "out", ring_bytes=16 << 10)
    out = dst / "model.safetensors"
    raw = out.read_bytes()
    header = json.loads(raw[8:8 + int.from_bytes(raw[:8], "little")])
    got = {s.name: s for s in read_header(out).tensors}
    assert header[WEIGHT]["dtype"] == "F8_E4M3" and header[WEIGHT + "_scale"]["dtype"] == "F32"
    for name, (dtype, shape, data) in src.items():
        if name == WEIGHT:
            continue
        assert (header[name]["dtype"], header[name]["shape"]) == (dtype, shape), name
        assert raw[got[name].start:got[name].end] == data, name
    # safetensors' own reader takes the file, and agrees on what it can read
    with safe_open(str(out), "pt") as f:
        assert set(f.keys()) == set(src) | {WEIGHT + "_scale"}
        for name in ("x.u16", "x.u32", "x.u64", "x.f8_e8m0", "x.c64", "x.f4", "x.f8_e4m3fnuz", "big.u16"):
            assert _bytes(f.get_tensor(name)) == src[name][2], name
            assert f.get_tensor(name).dtype == _expected_torch(*src[name][:2])[0], name
    # and the converted checkpoint streams back the same bytes
    again = stream_quantize(dst, "cpu", io="pread")
    for name, (dtype, shape, data) in src.items():
        if name != WEIGHT:
            _check_passthrough(name, again[name], dtype, shape, data)
    assert torch.equal(again[WEIGHT].data.view(torch.uint8),
                       stream_quantize(ckpt_dir, "cpu")[WEIGHT].data.view(torch.uint8))


def test_writer_takes_dtype_names_and_torch_dtypes(tmp_path):
    t6 = torch.arange(6, dtype=torch.uint8)   # F6_E2M3 [2, 4] is 6 bytes
    entries = [("a", "F6_E2M3", (2, 4)), ("b", torch.uint16, (3,)), ("c", "F4", (2, 4))]
    with SafetensorsWriter(tmp_path / "w.safetensors", entries) as w:
        w.write("a", t6.reshape(2, 3))
        w.write("b", torch.tensor([1, 2, 65535], dtype=torch.uint16))
        w.write("c", torch.tensor([[1, 2], [3, 4]], dtype=torch.uint8).view(torch.float4_e2m1fn_x2))
    specs = {s.name: s for s in read_header(tmp_path / "w.safetensors").tensors}
    assert [(s.dtype, s.shape, s.nbytes) for s in specs.values()] == [
        ("F6_E2M3", (2, 4), 6), ("U16", (3,), 6), ("F4", (2, 4), 4)]
    with pytest.raises(ValueError, match="unknown safetensors dtype 'F7'"):
        SafetensorsWriter(tmp_path / "x.safetensors", [("a", "F7", (2,))])
    with pytest.raises(ValueError, match="not a whole number of bytes"):
        SafetensorsWriter(tmp_path / "y.safetensors", [("a", "F4", (3,))])


def test_inspect_totals_every_dtype(ckpt_dir):
    p = estimate(ckpt_dir, "cpu")
    src = _source(ckpt_dir)
    want: dict[str, tuple[int, int]] = {}
    for dtype, _, data in src.values():
        n, b = want.get(dtype, (0, 0))
        want[dtype] = (n + 1, b + len(data))
    assert p.dtypes == want and p.quantized.count == 1


@pytest.mark.parametrize("dtype,shape,nbytes,bits", [
    ("F4", [3], 2, 12), ("F4", [1], 1, 4), ("F6_E2M3", [2, 3], 5, 36), ("F6_E3M2", [5], 4, 30)])
def test_sub_byte_tensor_must_hold_whole_bytes(tmp_path, dtype, shape, nbytes, bits):
    path = tmp_path / "sub.safetensors"
    write_file(path, [("pad", "U8", [3], b"abc"), ("w.sub", dtype, shape, bytes(nbytes))])
    with pytest.raises(HeaderError) as e:
        read_header(path)
    msg = str(e.value)
    for part in (str(path), "'w.sub'", dtype, f"{bits} bits", "not a whole number of bytes",
                 f"data_offsets [3, {3 + nbytes}]", "file bytes"):
        assert part in msg, (part, msg)


@pytest.mark.parametrize("dtype,shape,nbytes,need", [
    ("F4", [2, 4], 5, 4), ("F4", [2, 4], 3, 4), ("F6_E2M3", [4], 4, 3), ("F6_E3M2", [8, 4], 25, 24),
    ("U16", [3], 4, 6), ("C64", [2], 8, 16)])
def test_wrong_byte_count_is_refused(tmp_path, dtype, shape, nbytes, need):
    path = tmp_path / "n.safetensors"
    write_file(path, [("w.n", dtype, shape, bytes(nbytes))])
    with pytest.raises(HeaderError, match=rf"'w\.n'.*{dtype} shape .* needs {need} bytes .*span {nbytes} bytes"):
        read_header(path)


@pytest.mark.parametrize("dtype", ["F4_E2M1", "U128", "c64", "F6", "FP8"])
def test_unknown_dtype_is_a_header_error_listing_the_known_ones(tmp_path, dtype):
    path = tmp_path / "u.safetensors"
    write_file(path, [("w.u", dtype, [2], bytes(2))])
    with pytest.raises(HeaderError) as e:
        read_header(path)
    msg = str(e.value)
    assert all(part in msg for part in (str(path), "'w.u'", repr(dtype), "[0, 2]", *FORMAT_DTYPES)), msg
