"""The load configuration: every option's bad values are an OptionsError naming it, before any
I/O, through LoadConfig and through every public verb; the verbs' signatures list every option
with LoadConfig's default; numpy ints; FP8 schemes; progress with and without tqdm."""

import dataclasses
import inspect
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import mmapload
from mmapload import LoadConfig, LoadOptions, OptionsError, PerBlock, PerChannel, PerTensor
from mmapload import fp8 as F
from mmapload.config import KEYWORDS, MIN_RING_BYTES, RING_BYTES, config_from
from mmapload.converter import convert
from mmapload.estimate import estimate
from mmapload.nn import load_into
from mmapload.stream import iter_quantized, stream_quantize

VERBS = {
    "stream_quantize": lambda p, **kw: stream_quantize(p, **kw),
    "iter_quantized": lambda p, **kw: iter_quantized(p, **kw),
    "convert": lambda p, **kw: convert(p, p.parent / "out", **kw),
    "load_into": lambda p, **kw: load_into(torch.nn.Linear(4, 4, device="meta"), p, **kw),
    "estimate": lambda p, **kw: estimate(p, **kw),
}
FLAG_BAD = [1, 0, "yes", None, np.bool_(True)]
BAD = [  # (option, bad value): wrong type, out of range, typos
    *[("ring_bytes", v) for v in ("big", 100, MIN_RING_BYTES - 1, -1, True, 1.5e9, None, np.float64(1e9))],
    *[("fp8_dtype", v) for v in (torch.float16, torch.int8, "fp4", None, 8)],
    *[("granularity", v) for v in ("row", "", None, 3, "tensors", F.Granularity)],
    *[("block_size", v) for v in ((0, 128), (128,), (128, 128, 1), (1.5, 2), (True, 4), (4, False), "ab",
                                  None, 128, (-1, 4), (np.int64(0), 4), (np.float32(4), 4))],
    *[("scale_dtype", v) for v in ("bf16", "Weight", torch.bfloat16, torch.float32, None, "")],
    *[(name, v) for name in ("skip", "ignore") for v in ([""], 3, [None], ["re:("], [b"x"])],
    *[("targets", v) for v in ([""], 5, ["re:["])],
    *[("policy", v) for v in ("guess", "Auto", None, 1)],
    *[("fp8_weight_scale", v) for v in (0, -1.0, float("inf"), float("nan"), True, "1")],
    *[(name, v) for name in ("progress", "drop_page_cache", "error_stats", "keep_partial") for v in FLAG_BAD],
    *[("io", v) for v in ("directt", "MMAP", "o_direct", "", None, 1)],
    *[("read_threads", v) for v in (0, 65, -1, 2.0, True, "2")],
    *[("tp_size", v) for v in (0, -1, 2.0, True, "2", None)],
    *[("tp_rank", v) for v in (-1, 1, 1.0, True, "0")],      # 1: not below the default tp_size=1
    *[("process_group", v) for v in ("world", 1, object())],
    *[("tp_plan", v) for v in ("column", {"q_proj": "col"}, {"": "row"}, {"re:(": "row"}, [("a", "row")])],
    *[("tp_timeout", v) for v in (0, -1.0, float("inf"), float("nan"), True, "30", None)],
]


def _ckpt(tmp_path):
    save_file({"a.weight": torch.randn(4, 4), "b": torch.randn(3)}, tmp_path / "m.safetensors")
    return tmp_path / "m.safetensors"


def test_every_option_has_bad_values_in_the_table():
    assert {name for name, _ in BAD} == set(KEYWORDS)


@pytest.mark.parametrize("name,value", BAD, ids=[f"{n}={v!r}" for n, v in BAD])
def test_bad_value_is_an_options_error_naming_the_option(name, value):
    with pytest.raises(OptionsError, match=name):
        LoadConfig(**{name: value})


@pytest.mark.parametrize("verb", VERBS)
def test_every_verb_validates_every_option_before_any_io(tmp_path, verb):
    missing = tmp_path / "does-not-exist.safetensors"   # validation comes first, so no CheckpointError
    for name, value in BAD:
        with pytest.raises(OptionsError, match=name):
            VERBS[verb](missing, **{name: value})
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("verb", VERBS)
def test_an_unknown_keyword_is_an_options_error_naming_it(tmp_path, verb):
    path = _ckpt(tmp_path)
    for exc in (OptionsError, TypeError):   # typed, and the TypeError Python raises for a bad keyword
        with pytest.raises(exc, match=rf"{verb}\(\) got unknown option\(s\) \['nonsense'\]; known options"):
            VERBS[verb](path, nonsense=1)
    with pytest.raises(OptionsError, match="'ring_size': did you mean 'ring_bytes'"):
        VERBS[verb](path, ring_size=1 << 20)
    assert not (tmp_path / "out").exists()
    with pytest.raises(OptionsError, match=r"unknown option\(s\) \['nonsense'\]"):
        LoadConfig.from_kwargs(nonsense=1)


@pytest.mark.parametrize("verb", [mmapload.stream_quantize, mmapload.iter_quantized, mmapload.convert,
                                  load_into, estimate], ids=lambda v: v.__name__)
def test_signature_lists_every_option_with_the_config_default(verb):
    want = inspect.signature(LoadConfig).parameters
    got = inspect.signature(verb).parameters
    assert not any(p.kind is p.VAR_KEYWORD for p in got.values()), "no **options on a public verb"
    for name in KEYWORDS:
        assert name in got, f"{verb.__name__} lacks {name}"
        assert got[name].kind is inspect.Parameter.KEYWORD_ONLY, name
        assert got[name].default == want[name].default, name
        assert type(got[name].default) is type(want[name].default), name
    defaults = {k: got[k].default for k in KEYWORDS}
    assert config_from(defaults) == LoadConfig()
    doc = inspect.getdoc(verb)
    for section in ("Args:", "Returns:", "Raises:", "Example:"):
        assert section in doc, f"{verb.__name__}: no {section}"
    for name in KEYWORDS:
        assert name in doc, f"{verb.__name__}'s docstring does not name {name}"


def test_config_fields_are_the_keywords_with_the_scheme_parsed_once():
    fields = {f.name for f in dataclasses.fields(LoadConfig)}
    assert fields == set(KEYWORDS) - {"granularity", "block_size"} | {"scheme", "source_block"}
    doc = inspect.getdoc(LoadConfig)
    assert all(name in doc for name in KEYWORDS)
    c = LoadConfig()
    assert (c.ring_bytes, c.scheme, c.granularity, c.block_size) == (RING_BYTES, PerTensor(),
                                                                     F.Granularity.TENSOR, (128, 128))
    assert LoadOptions is LoadConfig and mmapload.LoadOptions is LoadConfig
    b = LoadConfig(granularity="BLOCK", block_size=[64, 32])
    assert b.scheme == PerBlock(64, 32) and b.granularity is F.Granularity.BLOCK and b.block_size == (64, 32)
    with pytest.raises(dataclasses.FrozenInstanceError):
        b.ring_bytes = 1
    with pytest.raises(AttributeError):
        b.granularity = "tensor"   # read-only, derived from the scheme
    for c in (b, LoadConfig(granularity=PerChannel(), block_size=(8, 8), skip="x", io="pread"), LoadConfig()):
        assert LoadConfig(**c.as_kwargs()) == c and hash(LoadConfig(**c.as_kwargs())) == hash(c)


def test_scheme_objects_and_spellings_are_one_config():
    assert LoadConfig(granularity=PerBlock(64, 64)) == LoadConfig(granularity="block", block_size=(64, 64))
    assert LoadConfig(granularity=F.Granularity.CHANNEL).scheme == PerChannel()
    # a tensor / channel load still reads an FP8 source's undeclared blocks with block_size
    assert LoadConfig(block_size=(64, 64)).block_size == (64, 64)
    with pytest.raises(OptionsError, match="granularity=PerBlock.*block_size=.*disagree"):
        LoadConfig(granularity=PerBlock(64, 64), block_size=(32, 32))


def test_numpy_ints_are_accepted_consistently():
    i64, i32 = np.int64, np.int32
    c = LoadConfig(ring_bytes=i64(1 << 20), block_size=(i64(64), i32(32)), granularity="block",
                   read_threads=i32(2))
    assert c == LoadConfig(ring_bytes=1 << 20, block_size=(64, 32), granularity="block", read_threads=2)
    assert all(type(v) is int for v in (c.ring_bytes, *c.block_size, c.read_threads))
    assert F.as_scheme("block", (i64(64), i32(32))) == PerBlock(i64(64), i64(32)) == PerBlock(64, 32)
    w = torch.randn(70, 90)
    q1, s1 = F.quantize(w, "block", block_size=(i64(16), i64(32)))
    q2, s2 = F.quantize(w, PerBlock(16, 32))
    assert torch.equal(q1.view(torch.uint8), q2.view(torch.uint8)) and torch.equal(s1, s2)
    assert F.scale_shape((3, 70, 90), "block", (i64(16), i32(32))) == (3, 5, 3)


def test_schemes_carry_their_parameters():
    assert [s.name for s in (PerTensor(), PerChannel(), PerBlock())] == ["tensor", "channel", "block"]
    assert PerBlock() == PerBlock(128, 128) and PerBlock(2, 3).granule(10, 10) == (2, 3)
    assert PerTensor().granule(5, 7) == (5, 7) and PerChannel().granule(5, 7) == (1, 7)
    assert PerTensor().scale_shape((5, 7)) == () and PerTensor().scale_shape((2, 5, 7)) == (2, 1, 1)
    assert PerChannel().scale_shape((5, 7)) == (5, 1) and PerBlock(2, 3).scale_shape((5, 7)) == (3, 3)
    for bad in ((0, 4), (True, 4), (1.0, 4), ("2", 4)):
        with pytest.raises(OptionsError, match="PerBlock"):
            PerBlock(*bad)
    w = torch.randn(2, 33, 65)
    for scheme, spelling in ((PerTensor(), ("tensor",)), (PerChannel(), ("channel",)),
                             (PerBlock(16, 32), ("block", torch.float8_e4m3fn, (16, 32)))):
        q, s = F.quantize(w, scheme)
        q2, s2 = F.quantize(w, *spelling)
        assert torch.equal(q.view(torch.uint8), q2.view(torch.uint8)) and torch.equal(s, s2)
        assert torch.equal(F.dequantize(q, s, scheme), F.dequantize(q2, s2, *spelling[::2]))
        assert F.relative_error(w, q, s, scheme) < 0.1


def test_read_threads_automatic_and_explicit():   # moved from test_stream.py
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    auto = LoadConfig()
    assert [auto.read_threads_for(cpu, n) for n in (None, 1, 2, 64)] == [1, 1, 2, 2]   # the quantizer needs the cores
    assert [auto.read_threads_for(cuda, n) for n in (None, 1, 2, 6, 16, 128)] == [1, 1, 1, 3, 4, 4]
    assert LoadConfig(read_threads=6).read_threads_for(cpu, 2) == 6


@pytest.mark.parametrize("with_tqdm", [True, False])
def test_progress_with_and_without_tqdm(tmp_path, capsys, monkeypatch, with_tqdm, no_thread_leak):
    path = _ckpt(tmp_path)
    quiet = stream_quantize(path)
    capsys.readouterr()
    if not with_tqdm:
        monkeypatch.setitem(sys.modules, "tqdm", None)   # `from tqdm import tqdm` raises ImportError
    loud = stream_quantize(path, progress=True)
    err = capsys.readouterr().err
    total = path.stat().st_size - 8 - int.from_bytes(path.read_bytes()[:8], "little")   # data bytes
    if with_tqdm:
        assert err.count("mmapload: ") >= 1 and "100%|" in err and "B/s]" in err and "GB/s ETA" not in err
    else:
        assert err.startswith("\rmmapload: ") and "GB/s ETA" in err and err.endswith("\n")
        assert f"{total / 1e9:.2f}/{total / 1e9:.2f} GB" in err
    assert list(loud) == list(quiet)
    assert torch.equal(loud["b"], quiet["b"])
    assert torch.equal(loud["a.weight"].data.view(torch.uint8), quiet["a.weight"].data.view(torch.uint8))
    assert torch.equal(loud["a.weight"].scale, quiet["a.weight"].scale)
