"""Tests for mmapload.fp8 against a slow reference written from the formulas:

per granule, scale = amax / fp8_max in float32 (amax exact, 0 -> 1.0, floor at
float32 tiny); q = fp8(clamp(float32(w) / scale, -max, max)); deq = float32(q) * scale.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from mmapload import fp8 as F
from mmapload.errors import MmapLoadError, NonFiniteError, OptionsError

E4, E5 = torch.float8_e4m3fn, torch.float8_e5m2
GRANS = ["tensor", "channel", "block"]
TINY = torch.finfo(torch.float32).tiny


# ---------------------------------------------------------------- reference
def ref_granule(shape2d, g, bs):
    rows, cols = shape2d
    return {"tensor": (rows, cols), "channel": (1, cols), "block": tuple(bs)}[g]


def ref_quantize_2d(w, g, dt, bs=(128, 128), weight_dtype=False):
    """Per-granule loop straight from the formulas. ``weight_dtype``: compressed-tensors'
    calculate_qparams + _quantize instead, in w's dtype: scale = dtype(amax) / fp8_max (0 ->
    finfo(dtype).eps); q = fp8(clamp(dtype(w / scale)))."""
    fmax = {E4: 448.0, E5: 57344.0}[dt]
    rows, cols = w.shape
    br, bc = ref_granule(w.shape, g, bs)
    nbr, nbc = -(-rows // br), -(-cols // bc)
    scale = torch.empty(nbr, nbc, dtype=w.dtype if weight_dtype else torch.float32)
    q = torch.empty(rows, cols, dtype=dt)
    for i in range(nbr):
        for j in range(nbc):
            sl = (slice(i * br, (i + 1) * br), slice(j * bc, (j + 1) * bc))
            blk = w[sl]
            if weight_dtype:
                s = blk.abs().max() / torch.tensor(fmax, dtype=w.dtype)
                s = torch.tensor(torch.finfo(w.dtype).eps, dtype=w.dtype) if s == 0 else s
                q[sl] = torch.clamp(blk / s, -fmax, fmax).to(dt)
            else:
                amax = blk.abs().max().to(torch.float32)  # abs/max exact in the source dtype
                s = torch.tensor(1.0) if amax == 0 else torch.maximum(amax / fmax, torch.tensor(TINY))
                q[sl] = torch.clamp(blk.to(torch.float32) / s, -fmax, fmax).to(dt)
            scale[i, j] = s
    return q, (scale.reshape(()) if g == "tensor" else scale)


def ref_quantize(w, g, dt, bs=(128, 128)):
    if w.dim() == 2:
        return ref_quantize_2d(w, g, dt, bs)
    qs, ss = zip(*(ref_quantize_2d(m, g, dt, bs) for m in w))
    ss = [s.reshape(1, 1) if g == "tensor" else s for s in ss]
    return torch.stack(qs), torch.stack(ss)


def ref_expand(scale2d, shape2d, g, bs):
    """Full-size scale map of one matrix (repeat each granule's scale over the granule)."""
    br, bc = ref_granule(shape2d, g, bs)
    s = scale2d.reshape(-1, scale2d.shape[-1]) if scale2d.dim() else scale2d.reshape(1, 1)
    return s.repeat_interleave(br, 0)[: shape2d[0]].repeat_interleave(bc, 1)[:, : shape2d[1]]


def ref_dequantize(q, scale, g, bs=(128, 128)):
    if q.dim() == 2:
        return q.to(torch.float32) * ref_expand(scale, q.shape, g, bs)
    return torch.stack([ref_dequantize(qm, sm, g, bs) for qm, sm in zip(q, scale)])


def bits(q):
    return q.view(torch.uint8)


def assert_same(q, s, qr, sr):
    same = (bits(q) == bits(qr)).float().mean().item()
    assert same >= 0.999 and same == 1.0, f"only {same:.6%} of fp8 bytes identical"
    assert s.shape == sr.shape and s.dtype == torch.float32
    assert torch.equal(s, sr), (s - sr).abs().max()


def randw(shape, dtype=torch.bfloat16, seed=0, mult=3.0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * mult
    # per-row magnitudes spread over 6 decades so channel/block scales differ
    w *= torch.logspace(-3, 3, shape[-2]).unsqueeze(-1)
    return w.to(dtype)


# ---------------------------------------------------------------- equality with the reference
@pytest.mark.parametrize("dt", [E4, E5])
@pytest.mark.parametrize("g, bs", [("tensor", (128, 128)), ("channel", (128, 128)),
                                   ("block", (128, 128)), ("block", (64, 32))])
@pytest.mark.parametrize("shape", [(300, 200), (129, 257), (2, 129, 257), (3, 70, 45)])
def test_matches_reference(shape, g, dt, bs):
    w = randw(shape, seed=hash((shape, g)) % 1000)
    q, s = F.quantize(w, g, dt, bs)
    qr, sr = ref_quantize(w, g, dt, bs)
    assert s.shape == F.scale_shape(shape, g, bs)
    assert_same(q, s, qr, sr)


@pytest.mark.parametrize("src", [torch.float32, torch.float16, torch.float64])
@pytest.mark.parametrize("g", GRANS)
def test_matches_reference_other_source_dtypes(src, g):
    w = randw((97, 130), dtype=src, mult=0.01 if src == torch.float16 else 3.0)
    for dt in (E4, E5):
        qr, sr = ref_quantize(w, g, dt, (32, 64))
        assert_same(*F.quantize(w, g, dt, (32, 64)), qr, sr)
        assert_same(*F.Quantizer(dt, g, (32, 64), scratch_elems=37).quantize(w), qr, sr)  # odd scratch


def test_rank4_leading_dims_are_independent_matrices():
    w = randw((2, 3, 40, 50))
    for g in GRANS:
        q, s = F.quantize(w, g, E4, (16, 16))
        assert s.shape == F.scale_shape(w.shape, g, (16, 16))
        for i in range(2):
            assert_same(q[i], s[i], *ref_quantize(w[i], g, E4, (16, 16)))


def test_non_contiguous_input():
    w = randw((150, 90)).t()
    for g in GRANS:
        assert_same(*F.quantize(w, g, E4, (64, 32)), *ref_quantize(w.contiguous(), g, E4, (64, 32)))


def test_scale_shape():
    assert F.scale_shape((300, 200), "tensor") == ()
    assert F.scale_shape((300, 200), "channel") == (300, 1)
    assert F.scale_shape((300, 200), "block") == (3, 2)
    assert F.scale_shape((300, 200), "block", (64, 32)) == (5, 7)
    assert F.scale_shape((4, 300, 200), "tensor") == (4, 1, 1)
    assert F.scale_shape((4, 300, 200), "channel") == (4, 300, 1)
    assert F.scale_shape((4, 256, 129), F.Granularity.BLOCK) == (4, 2, 2)
    assert F.scale_shape((2, 3, 5, 7), "block", (2, 2)) == (2, 3, 3, 4)


# ---------------------------------------------------------------- chunking invariant
def pipeline(w, g, dt, bs, cuts, scratch=None):
    """What the streaming loader does: per row-range chunk amax / scale / quantize_2d_into."""
    Q = F.Quantizer(dt, g, bs, scratch_elems=scratch)
    bounds = [0, *cuts, w.shape[0]]
    chunks = [(a, b) for a, b in zip(bounds, bounds[1:]) if b > a]
    out = torch.empty(w.shape, dtype=dt)
    if g == "tensor":
        s = F.scale_from_amax(functools.reduce(F.merge_amax, [F.amax_2d(w[a:b], g, bs) for a, b in chunks]), dt)
        for a, b in chunks:
            Q.quantize_2d_into(w[a:b], s, out[a:b])
        return out, s
    scales = []
    for a, b in chunks:
        s = F.scale_from_amax(F.amax_2d(w[a:b], g, bs), dt)
        Q.quantize_2d_into(w[a:b], s, out[a:b])
        scales.append(s)
    return out, torch.cat(scales)


@pytest.mark.parametrize("g", GRANS)
@pytest.mark.parametrize("dt", [E4, E5])
@pytest.mark.parametrize("scratch", [None, 50, 700])
def test_chunked_equals_whole(g, dt, scratch):
    w = randw((300, 200), seed=7)
    bs = (64, 32)
    cuts = [64, 128, 256] if g == "block" else [1, 37, 38, 200]
    q, s = F.Quantizer(dt, g, bs, scratch_elems=scratch).quantize(w)
    assert_same(*pipeline(w, g, dt, bs, cuts, scratch), q, s)
    assert_same(q, s, *ref_quantize(w, g, dt, bs))


@settings(max_examples=60, deadline=None)
@given(rows=st.integers(1, 48), cols=st.integers(1, 48), br=st.integers(3, 20), bc=st.integers(3, 20),
       g=st.sampled_from(GRANS), dt=st.sampled_from([E4, E5]), scratch=st.integers(1, 300),
       ncuts=st.integers(0, 3), seed=st.integers(0, 10**6), data=st.data())
def test_property_chunked_small_scratch_matches_reference(rows, cols, br, bc, g, dt, scratch, ncuts, seed, data):
    w = (torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))
         * torch.logspace(-2, 2, rows).unsqueeze(1)).to(torch.bfloat16)
    step = br if g == "block" else 1
    cuts = sorted(data.draw(st.lists(st.integers(0, (rows - 1) // step), max_size=ncuts)))
    q, s = pipeline(w, g, dt, (br, bc), [c * step for c in cuts], scratch)
    assert_same(q, s, *ref_quantize(w, g, dt, (br, bc)))


# ---------------------------------------------------------------- edge values
@pytest.mark.parametrize("dt", [E4, E5])
@pytest.mark.parametrize("g", GRANS)
def test_saturation_outlier(g, dt):
    fmax = F.fp8_max(dt)
    w = randw((130, 70), seed=3, mult=0.01)
    w[5, 6], w[129, 69] = 1e6, -1e6
    q, s = F.quantize(w, g, dt, (64, 32))
    assert q[5, 6].item() == fmax and q[129, 69].item() == -fmax
    assert torch.isfinite(q.float()).all()
    assert_same(q, s, *ref_quantize(w, g, dt, (64, 32)))


@pytest.mark.parametrize("dt", [E4, E5])
@pytest.mark.parametrize("g", GRANS)
def test_saturation_with_preset_scale(g, dt):
    fmax = F.fp8_max(dt)
    w = randw((130, 70), seed=4, mult=1.0)
    w[0, 0], w[100, 3] = 1e6, -1e6
    shape = F.scale_shape(w.shape, g, (64, 32))
    scale = torch.full(shape, 1e-3, dtype=torch.float32)  # far too small: most values overflow
    out = torch.empty(w.shape, dtype=dt)
    F.Quantizer(dt, g, (64, 32)).quantize_2d_into(w, scale, out)
    o = out.float()
    assert o[0, 0].item() == fmax and o[100, 3].item() == -fmax
    assert torch.isfinite(o).all()
    expect = torch.clamp(w.float() / 1e-3, -fmax, fmax).to(dt)
    assert torch.equal(bits(out), bits(expect))


@pytest.mark.parametrize("g", GRANS)
def test_all_zero(g):
    for dt in (E4, E5):
        w = torch.zeros(2, 130, 70, dtype=torch.bfloat16)
        q, s = F.quantize(w, g, dt, (64, 32))
        assert torch.equal(s, torch.ones(F.scale_shape(w.shape, g, (64, 32))))
        assert (bits(q) == 0).all()
        assert torch.equal(F.dequantize(q, s, g, (64, 32)), torch.zeros(w.shape))
    assert F.relative_error(w, q, s, g, (64, 32)) == 0.0


@pytest.mark.parametrize("g", GRANS)
def test_tiny_values_keep_precision(g):
    w = randw((96, 80), dtype=torch.float32, seed=5, mult=1.0) * 1e-30
    for dt, bound in ((E4, 0.07), (E5, 0.15)):
        q, s = F.quantize(w, g, dt, (32, 32))
        assert torch.isfinite(s).all() and (s > 0).all()
        deq = F.dequantize(q, s, g, (32, 32))
        err = ((w.double() - deq.double()).norm() / w.double().norm()).item()
        normal = F.relative_error(w * 1e30, *F.quantize(w * 1e30, g, dt, (32, 32)), g, (32, 32))
        assert err < bound and err < 1.5 * normal + 1e-3, (err, normal)
        assert_same(q, s, *ref_quantize(w, g, dt, (32, 32)))


def test_scale_floor_and_zero():
    a = torch.tensor([0.0, 1e-44, 1e-30, 448.0, float("inf"), float("nan")])
    s = F.scale_from_amax(a, E4)
    assert s[0] == 1.0 and s[1] == TINY and s[2] == torch.tensor(1e-30) / 448 and s[3] == 1.0
    assert s[4] == float("inf") and math.isnan(s[5])
    assert s.dtype == torch.float32
    # subnormal float32 weights: floored scale stays finite, q finite and not all zero
    w = torch.tensor([[1e-44, -3e-44, 5e-45, 0.0]])
    q, s = F.quantize(w, "tensor", E4)
    assert s.item() == TINY and torch.isfinite(q.float()).all() and (bits(q) != 0).any()


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf"), -float("nan")])
@pytest.mark.parametrize("g", GRANS)
def test_non_finite_raises_with_name(g, bad):
    for shape, where in (((130, 70), (129, 69)), ((2, 130, 70), (1, 3, 66)), ((130, 70), (0, 0))):
        w = randw(shape, seed=1)
        w[where] = bad
        with pytest.raises(NonFiniteError, match="layers.3.mlp.w1"):
            F.quantize(w, g, E4, (64, 32), name="layers.3.mlp.w1")
        if len(shape) == 2:
            assert not F.check_finite(F.amax_2d(w, g, (64, 32)))
    assert issubclass(NonFiniteError, MmapLoadError)


def test_amax_exact_and_nan_propagating():
    w = torch.tensor([[1.0, -3.015625, 3.0, 2.0], [0.5, 0.25, -0.0, 0.0]], dtype=torch.bfloat16)
    assert F.amax_2d(w, "tensor").item() == 3.015625
    assert F.amax_2d(w, "tensor").shape == ()
    assert F.amax_2d(w, "channel").flatten().tolist() == [3.015625, 0.5]
    assert F.amax_2d(w, "block", (1, 3)).tolist() == [[3.015625, 2.0], [0.5, 0.0]]
    n = torch.tensor([1.0, float("nan")])
    assert math.isnan(F.merge_amax(n, torch.tensor([2.0, 1.0]))[1]) and F.merge_amax(n, n)[0] == 1.0
    assert F.check_finite(torch.ones(3)) and not F.check_finite(n)


# ---------------------------------------------------------------- dequantize / relative_error
@pytest.mark.parametrize("dt", [E4, E5])
@pytest.mark.parametrize("g", GRANS)
@pytest.mark.parametrize("shape", [(129, 257), (2, 70, 45)])
def test_dequantize_round_trip(shape, g, dt):
    bs = (64, 32)
    w = randw(shape, seed=9)
    q, s = F.quantize(w, g, dt, bs)
    deq = F.dequantize(q, s, g, bs)
    assert deq.dtype == torch.float32 and deq.shape == w.shape
    assert torch.equal(deq, ref_dequantize(q, s, g, bs))
    assert torch.equal(F.dequantize(q, s, g, bs, dtype=torch.bfloat16), deq.to(torch.bfloat16))
    # RNE error bound: half an fp8 ulp at w's magnitude (normals), half the subnormal step below
    mbits, sub = {E4: (3, 2.0**-9), E5: (2, 2.0**-16)}[dt]
    full = torch.stack([ref_expand(sm, shape[-2:], g, bs) for sm in s]) if len(shape) == 3 else \
        ref_expand(s, shape, g, bs)
    x = w.float()
    bound = torch.maximum(x.abs() * 2.0 ** -(mbits + 1), full * sub / 2) * (1 + 1e-5)
    assert ((x - deq).abs() <= bound).all()


@pytest.mark.parametrize("g", GRANS)
def test_relative_error_matches_direct(g):
    bs = (64, 32)
    for shape in ((129, 257), (2, 70, 45), (3000, 100)):
        w = randw(shape, seed=11)
        for dt in (E4, E5):
            q, s = F.quantize(w, g, dt, bs)
            deq = ref_dequantize(q, s, g, bs).double()
            direct = ((w.double() - deq).norm() / w.double().norm()).item()
            got = F.relative_error(w, q, s, g, bs)
            assert got == pytest.approx(direct, rel=1e-9, abs=0)
            assert 0 < got < (0.05 if dt == E4 else 0.1)


def test_quantizer_reuse_across_tensors():
    Q = F.Quantizer(E5, "block", (64, 32), scratch_elems=1000)
    for seed, shape in enumerate([(300, 200), (5, 7), (129, 257), (2, 65, 33)]):
        w = randw(shape, seed=seed)
        assert_same(*Q.quantize(w), *ref_quantize(w, "block", E5, (64, 32)))


def test_torch_fp8_cast_is_round_to_nearest_even():
    """The reference relies on torch's float32 -> fp8 cast; check it independently:
    every midpoint between neighbouring fp8 values rounds to the even code."""
    for dt in (E4, E5):
        vals = torch.arange(256, dtype=torch.uint8).view(dt).float()
        codes = [c for c in range(0x80) if math.isfinite(vals[c])]  # positive, ascending
        lo, hi = vals[codes[:-1]], vals[codes[1:]]
        got = bits(((lo + hi) / 2).to(dt)).tolist()
        assert got == [a if a % 2 == 0 else b for a, b in zip(codes[:-1], codes[1:])]
        assert bits(torch.nextafter((lo + hi) / 2, hi).to(dt)).tolist() == codes[1:]


# ---------------------------------------------------------------- bad options
def test_bad_options():
    w = randw((16, 16))
    for bad in ("row", "", None, 3):
        with pytest.raises(OptionsError):
            F.parse_granularity(bad)
        with pytest.raises(OptionsError):
            F.quantize(w, bad)
    assert F.parse_granularity("Block") is F.Granularity.BLOCK and F.Granularity.TENSOR == "tensor"
    for bad in (torch.float16, torch.int8, torch.float8_e4m3fnuz, "fp4", None):
        with pytest.raises(OptionsError):
            F.check_fp8_dtype(bad)
        with pytest.raises(OptionsError):
            F.quantize(w, "tensor", bad)
        with pytest.raises(OptionsError):
            F.Quantizer(bad)
    assert F.check_fp8_dtype("e5m2") is E5 and F.check_fp8_dtype(E4) is E4
    assert F.fp8_max(E4) == 448.0 and F.fp8_max(E5) == 57344.0 and F.FP8_DTYPES == (E4, E5)
    for bad in ((0, 128), (128,), (1.5, 2), (True, 4, 4), "ab", None):
        with pytest.raises(OptionsError):
            F.quantize(w, "block", E4, bad)
    with pytest.raises(OptionsError):  # rank < 2 is never quantized
        F.quantize(torch.ones(8), "tensor")
    with pytest.raises(OptionsError):
        F.scale_shape((8,), "channel")
    with pytest.raises(OptionsError):  # integer source
        F.quantize(torch.ones(4, 4, dtype=torch.int32))
    assert issubclass(OptionsError, ValueError)


def test_quantize_2d_into_checks_arguments():
    Q = F.Quantizer(E4, "channel")
    w = randw((8, 16))
    s = F.scale_from_amax(F.amax_2d(w, "channel"), E4)
    with pytest.raises(OptionsError):
        Q.quantize_2d_into(w, s, torch.empty(8, 15, dtype=E4))  # wrong out shape
    with pytest.raises(OptionsError):
        Q.quantize_2d_into(w, s, torch.empty(8, 16, dtype=E5))  # wrong out dtype
    with pytest.raises(OptionsError):
        Q.quantize_2d_into(w, s[:4], torch.empty(8, 16, dtype=E4))  # wrong scale shape
    with pytest.raises(OptionsError):
        Q.quantize_2d_into(w[0], s, torch.empty(16, dtype=E4))  # not 2-D
    with pytest.raises(OptionsError):
        F.dequantize(torch.empty(8, 16, dtype=E4), s[:4], "channel")


@pytest.mark.parametrize("g", GRANS)
def test_empty_tensors(g):
    for shape in ((0, 5), (5, 0), (2, 0, 3), (0, 4, 4)):
        w = torch.empty(shape, dtype=torch.bfloat16)
        q, s = F.quantize(w, g, E4, (2, 2))
        assert q.shape == w.shape and q.dtype == E4
        assert s.shape == F.scale_shape(shape, g, (2, 2)) and (s == 1).all()
        assert F.dequantize(q, s, g, (2, 2)).shape == w.shape
        assert F.relative_error(w, q, s, g, (2, 2)) == 0.0


# ---------------------------------------------------------------- scale_dtype="weight": compressed-tensors' numerics
def awkward(shape, dtype, seed=0):
    """Rows over many decades (the smallest underflow in float16), a zero row, -0.0 entries."""
    w = randw(shape, torch.float32, seed) * torch.logspace(-30, 0, shape[-2]).unsqueeze(-1)
    w = w.to(dtype)
    w[..., 3, :] = 0
    w[..., 5, :7] = -0.0
    return w


@pytest.mark.parametrize("src", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("g, bs", [("tensor", (128, 128)), ("channel", (128, 128)), ("block", (16, 32))])
@pytest.mark.parametrize("scratch", [None, 50])
def test_weight_scale_dtype_matches_the_compressed_tensors_formulas(src, g, bs, scratch):
    w = awkward((70, 45), src, seed=3)
    q, s = F.Quantizer(E4, g, bs, scratch_elems=scratch, scale_dtype="weight").quantize(w)
    qr, sr = ref_quantize_2d(w, g, E4, bs, weight_dtype=True)
    assert s.dtype == src and s.shape == sr.shape
    assert torch.equal(s, sr) and torch.equal(bits(q), bits(qr))
    assert torch.equal(bits(q), bits(F.quantize(w, g, E4, bs, scale_dtype="weight")[0]))
    if src is torch.bfloat16:   # and it is not the float32 arithmetic: some codes differ from it
        assert (bits(F.quantize(w, g, E4, bs)[0]) != bits(q)).any()


@pytest.mark.parametrize("src", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("g", ["tensor", "channel", "block"])
def test_weight_scale_dtype_is_byte_equal_to_compressed_tensors_itself(src, g):
    """The library's own calculate_qparams and quantize (what llm-compressor's model_free_ptq
    runs per weight): the same FP8 bytes and the same scales."""
    pytest.importorskip("compressed_tensors", reason="compressed-tensors not installed")
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import quantize as ct_quantize
    from compressed_tensors.quantization.utils.helpers import calculate_qparams
    bs = (16, 32)
    w = awkward((64, 96), src, seed=5)   # whole blocks: compressed-tensors pads none
    args = QuantizationArgs(num_bits=8, type="float", symmetric=True, strategy=g,
                            block_structure=list(bs) if g == "block" else None)
    if g == "tensor":
        lo, hi = w.amin().reshape(1), w.amax().reshape(1)
    elif g == "channel":
        lo, hi = w.amin(1, keepdim=True), w.amax(1, keepdim=True)
    else:
        blocks = w.unflatten(0, (-1, bs[0])).unflatten(2, (-1, bs[1]))
        lo, hi = blocks.amin((1, 3)), blocks.amax((1, 3))
    s_ct, _ = calculate_qparams(lo, hi, args)
    q_ct = ct_quantize(w, s_ct, None, args, dtype=E4)
    q, s = F.quantize(w, g, E4, bs, scale_dtype="weight")
    assert s.dtype == s_ct.dtype == src
    assert torch.equal(s.reshape(s_ct.shape), s_ct) and torch.equal(bits(q), bits(q_ct))


def test_scale_dtype_must_be_named():
    for bad in ("bf16", torch.bfloat16, None, ""):
        with pytest.raises(OptionsError, match="scale_dtype"):
            F.Quantizer(E4, scale_dtype=bad)
