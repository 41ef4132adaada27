"""FP8 numerics, no I/O, any device. Per granule, in float32 (vLLM / compressed-tensors):
``scale = amax / fp8_max`` (0 -> 1.0, else >= float32 tiny), ``q = fp8(clamp(w / scale, -max,
max))`` (true division, round to nearest even), ``dequantize = float32(q) * scale``. With
``scale_dtype="weight"`` the scale and the division are in the weight's dtype instead, as
compressed-tensors computes them (``scale_from_amax``). A weight
is ``[rows, cols]``; leading dims (MoE experts, any rank >= 3) index independent matrices, so
scales are ``lead + (1, 1) | (rows, 1) | (ceil(rows/br), ceil(cols/bc))``; 2-D tensor: 0-d.
A scheme (scheme.py: ``PerTensor()``, ``PerChannel()``, ``PerBlock(rows, cols)``) says how:
every one is a grid of granules (tensor: the matrix, channel: (1, cols)), run in pieces of a
bounded scratch: one code path, no full-size temporaries. Functions taking ``granularity``
accept a scheme, or a spelling ("tensor" | "channel" | "block", a ``Granularity``) with
``block_size`` (parsed by ``as_scheme``)."""

from __future__ import annotations

import math

import torch

from mmapload.dtypes import DTYPES
from mmapload.errors import DeviceError, NonFiniteError, OptionsError
from mmapload.scheme import (DEFAULT_BLOCK, Granularity, PerBlock, PerChannel, PerTensor, Scheme, as_scheme,
                             parse_granularity)

__all__ = ["Granularity", "Scheme", "PerTensor", "PerChannel", "PerBlock", "as_scheme", "DEFAULT_BLOCK",
           "FP8_DTYPES", "fp8_max", "parse_granularity", "check_fp8_dtype", "scale_shape", "granule",
           "amax_2d", "scale_from_amax", "merge_amax", "check_finite", "Quantizer", "quantize",
           "dequantize", "relative_error", "default_scratch_elems", "SCALE_DTYPES", "scale_dtype_of"]


# The two FP8 formats mmapload computes and writes, from the dtype table (dtypes.FP8): e4m3fn first
FP8_DTYPES: tuple[torch.dtype, ...] = (DTYPES["F8_E4M3"], DTYPES["F8_E5M2"])
_FP8_NAMES = {"float8_e4m3fn": FP8_DTYPES[0], "e4m3fn": FP8_DTYPES[0], "e4m3": FP8_DTYPES[0],
              "float8_e5m2": FP8_DTYPES[1], "e5m2": FP8_DTYPES[1]}
# Source dtypes -> same-width ints. Clearing the sign bit gives |x|, and non-negative float
# bit patterns sort like their values (NaN above Inf): an integer max over masked bits is
# an exact, NaN-propagating amax, 2.5-5x faster on CPU than bf16 amax() + amin().
_BITS = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32,
         torch.float64: torch.int64}
_TINY = torch.finfo(torch.float32).tiny
# LoadConfig.scale_dtype: float32 scales (vLLM), or the weight's dtype (compressed-tensors)
SCALE_DTYPES = ("float32", "weight")


def default_scratch_elems(device) -> int:
    """Float32 elements of a Quantizer's scratch on ``device`` unless told otherwise. CPU: 256K
    (1 MiB) stays in L2 and measured fastest (64K: per-op overhead dominates, ~30% slower).
    CUDA: 4M so kernel launches amortise (a guess)."""
    return 1 << 22 if torch.device(device).type == "cuda" else 1 << 18


def check_fp8_dtype(dtype) -> torch.dtype:
    """The torch fp8 dtype for ``dtype`` (a torch dtype or a name like "e4m3")."""
    if isinstance(dtype, str):
        dtype = _FP8_NAMES.get(dtype.strip().lower().removeprefix("torch."), dtype)
    if dtype not in FP8_DTYPES:
        raise OptionsError(f"unsupported fp8 dtype {dtype!r}; use torch.float8_e4m3fn or torch.float8_e5m2")
    return dtype


def fp8_max(fp8_dtype) -> float:
    return float(torch.finfo(check_fp8_dtype(fp8_dtype)).max)


def scale_shape(shape, granularity="tensor", block_size=DEFAULT_BLOCK) -> tuple[int, ...]:
    """``as_scheme(granularity, block_size).scale_shape(shape)``."""
    return as_scheme(granularity, block_size).scale_shape(shape)


def granule(shape2d, granularity="tensor", block_size=DEFAULT_BLOCK) -> tuple[int, int]:
    """``as_scheme(granularity, block_size).granule(*shape2d)``."""
    return as_scheme(granularity, block_size).granule(*shape2d[:2])


def _as_grid(scale) -> torch.Tensor:
    return scale.reshape(1, 1) if scale.dim() < 2 else scale


def _spans(n: int, b: int, step: int) -> list[tuple[int, int]]:
    """Spans of <= step items of range(n): whole b-blocks from a boundary, or part of one block."""
    step = max(1, step)
    if b <= step:
        s = step // b * b
        return [(i, min(n, i + s)) for i in range(0, n, s)]
    s = -(-b // -(-b // step))  # equal pieces per block, no tiny remainder piece
    return [(j, min(n, i + b, j + s)) for i in range(0, n, b) for j in range(i, min(n, i + b), s)]


def _pieces(rows, cols, br, bc, cap):
    """(r0, r1, c0, c1) granule-aligned pieces of at most ``cap`` elements."""
    cspans = _spans(cols, bc, cap)
    width = max((c1 - c0 for c0, c1 in cspans), default=1)
    return [(r0, r1, c0, c1) for r0, r1 in _spans(rows, br, cap // width) for c0, c1 in cspans]


def _apply_grid(t, grid, br, bc, op, r0=0, c0=0) -> None:
    """In place ``op(t, scale)``, t = a _pieces piece at (r0, c0) of a matrix with scale grid
    ``grid``. Broadcast views, never expanded copies; ragged edges are separate regions."""
    grid, (nr, nc) = grid[r0 // br:, c0 // bc:], t.shape
    (nfr, nfc), fr, fc = (nr // br, nc // bc), nr // br * br, nc // bc * bc
    if fr and fc:
        op(t[:fr, :fc].unflatten(1, (nfc, bc)).unflatten(0, (nfr, br)), grid[:nfr, None, :nfc, None])
    if fr and fc < nc:
        op(t[:fr, fc:].unflatten(0, (nfr, br)), grid[:nfr, None, nfc:nfc + 1])
    if fr < nr and fc:
        op(t[fr:, :fc].unflatten(1, (nfc, bc)), grid[nfr, :nfc, None])
    if fr < nr and fc < nc:
        op(t[fr:, fc:], grid[nfr, nfc])


@torch.no_grad()
def _grid_amax(x, br, bc, buf, itype) -> torch.Tensor:
    """Exact max |x| per br x bc granule of 2-D x, as float32; buf: flat scratch."""
    rows, cols = x.shape
    xi, ibuf = x.view(itype), buf.view(itype)
    mask = (1 << (8 * xi.element_size() - 1)) - 1
    grid = torch.zeros((rows, -(-cols // bc)), dtype=itype, device=x.device)  # per row, per column block
    for r0, r1, c0, c1 in _pieces(rows, cols, 1, bc, ibuf.numel()):
        t = ibuf[: (r1 - r0) * (c1 - c0)].view(r1 - r0, c1 - c0)
        torch.bitwise_and(xi[r0:r1, c0:c1], mask, out=t)
        g, fc = grid[r0:r1, c0 // bc: -(-c1 // bc)], (c1 - c0) // bc * bc
        if fc:  # whole column blocks: amax over the last dim of a [r, nbc, bc] view
            gv = g[:, : fc // bc]
            torch.maximum(gv, t[:, :fc].unflatten(1, (fc // bc, bc)).amax(-1), out=gv)
        if fc < c1 - c0:  # ragged edge block, or a piece of one wide granule
            torch.maximum(g[:, -1:], t[:, fc:].amax(-1, keepdim=True), out=g[:, -1:])
    if br > 1:  # then max over the rows of each block row; zero rows pad the ragged one
        nbr = -(-rows // br)
        grid = torch.nn.functional.pad(grid, (0, 0, 0, nbr * br - rows)).view(nbr, br, -1).amax(1)
    return grid.view(x.dtype).float()


@torch.no_grad()
def amax_2d(x, granularity, block_size=DEFAULT_BLOCK) -> torch.Tensor:
    """Exact float32 amax of a 2-D chunk: 0-d (tensor), [rows, 1] (channel) or block grid."""
    return Quantizer(torch.float8_e4m3fn, granularity, block_size, x.device,
                     min(max(x.numel(), 1), default_scratch_elems(x.device))).amax_2d(x)


@torch.no_grad()
def scale_from_amax(amax, fp8_dtype, weight_dtype: torch.dtype | None = None) -> torch.Tensor:
    """The scale of a granule from its amax (float32; exact |w| maxima). ``weight_dtype`` None:
    float32 ``amax / fp8_max`` (vLLM's scaled_fp8_quant), floored at float32 tiny, 1.0 for a
    zero granule. A dtype: compressed-tensors' ``calculate_qparams`` in that dtype, so scales
    match llm-compressor's bit for bit: ``dtype(amax) / fp8_max`` rounded to the dtype (torch
    divides bf16 / fp16 in float32 and rounds once), a zero (or underflowed) scale -> the
    dtype's eps. Both: w / scale stays finite for finite w."""
    if weight_dtype is not None:
        s = amax.to(weight_dtype) / fp8_max(fp8_dtype)   # amax is a weight value: exact in its dtype
        return torch.where(s == 0, torch.finfo(weight_dtype).eps, s)
    s = amax.float() / fp8_max(fp8_dtype)  # true division; NaN/Inf propagate
    # tiny floor: no zero/subnormal scales; zero granule -> 1.0 keeps w / scale finite
    return torch.where(amax == 0, torch.ones_like(s), s.clamp(min=_TINY))


@torch.no_grad()
def merge_amax(a, b) -> torch.Tensor:
    return torch.maximum(a, b)  # NaN-propagating


def check_finite(t) -> bool:
    """True when every amax / scale in t is finite (one device sync)."""
    return bool(torch.isfinite(t).all())


class Quantizer:
    """Reusable fast quantizer: owns a bounded float32 scratch on one device, reused
    across calls; never allocates full-size temporaries. Not thread-safe. ``scale_dtype``:
    "float32" or "weight" (``LoadConfig.scale_dtype``; the scales ``scale`` makes)."""

    def __init__(self, fp8_dtype=torch.float8_e4m3fn, granularity="tensor", block_size=DEFAULT_BLOCK,
                 device="cpu", scratch_elems=None, scale_dtype: str = "float32"):
        if scale_dtype not in SCALE_DTYPES:
            raise OptionsError(f"scale_dtype must be one of {SCALE_DTYPES}, got {scale_dtype!r}")
        self.scale_dtype = scale_dtype
        self.fp8_dtype = check_fp8_dtype(fp8_dtype)
        self.scheme = as_scheme(granularity, block_size)
        self.granularity = self.scheme.granularity
        self.device = torch.device(device)
        n = default_scratch_elems(self.device) if scratch_elems is None else int(scratch_elems)
        if n < 1:
            raise OptionsError(f"scratch_elems must be >= 1, got {scratch_elems!r}")
        try:  # even size: the amax pass views it as int64 for float64 sources
            self._buf = torch.empty(n + n % 2, dtype=torch.float32, device=self.device)
        except (RuntimeError, AssertionError) as e:  # no CUDA in this build, bad device, OOM
            raise DeviceError(f"cannot allocate fp8 scratch on {self.device}: {e}") from e
        self.device, self._max = self._buf.device, fp8_max(self.fp8_dtype)

    def _check(self, x) -> torch.dtype:
        if x.dim() != 2 or x.device != self.device or x.dtype not in _BITS:
            raise OptionsError(f"expected a 2-D float16/bfloat16/float32/float64 chunk on {self.device}, "
                               f"got {x.dtype} {list(x.shape)} on {x.device}")
        return _BITS[x.dtype]

    def scale(self, amax, weight_dtype: torch.dtype) -> torch.Tensor:
        """``scale_from_amax`` under this quantizer's ``scale_dtype`` for a ``weight_dtype`` weight:
        a tensor of ``scale_dtype_of(self.scale_dtype, weight_dtype)``."""
        return scale_from_amax(amax, self.fp8_dtype, weight_dtype if self.scale_dtype == "weight" else None)

    @torch.no_grad()
    def amax_2d(self, x) -> torch.Tensor:
        """Module-level ``amax_2d`` with this quantizer's settings and scratch."""
        itype = self._check(x)
        if x.numel() == 0:  # empty granules: amax 0
            return torch.zeros(self.scheme.scale_shape(x.shape),
                               dtype=torch.float32, device=x.device)
        a = _grid_amax(x, *self.scheme.granule(*x.shape), self._buf, itype)
        return a.reshape(()) if self.granularity is Granularity.TENSOR else a

    @torch.no_grad()
    def quantize_2d_into(self, x, scale, out) -> None:
        self._check(x)
        if out.shape != x.shape or out.dtype != self.fp8_dtype or out.device != x.device:
            raise OptionsError(f"out must be {self.fp8_dtype} {list(x.shape)} on {x.device}, "
                               f"got {out.dtype} {list(out.shape)} on {out.device}")
        want = self.scheme.scale_shape(x.shape)
        if tuple(scale.shape) != want and not (want == () and scale.numel() == 1):
            raise OptionsError(f"scale shape {list(scale.shape)} does not match {list(want)} for a "
                               f"{list(x.shape)} chunk ({self.granularity.value})")
        scale = _as_grid(scale)
        br, bc = self.scheme.granule(*x.shape)
        # the quotient is computed and rounded in the scale's dtype: float32, or the weight's own
        # (compressed-tensors divides a bf16 weight by a bf16 scale: a bf16 quotient)
        buf = self._buf if scale.dtype == torch.float32 else _scratch_as(self._buf, scale.dtype)
        for r0, r1, c0, c1 in _pieces(*x.shape, br, bc, buf.numel()) if x.numel() else ():
            t = buf[: (r1 - r0) * (c1 - c0)].view(r1 - r0, c1 - c0)
            t.copy_(x[r0:r1, c0:c1])  # widening copy: exact (rounds only from float64)
            _apply_grid(t, scale, br, bc, torch.Tensor.div_, r0, c0)
            t.clamp_(-self._max, self._max)  # saturate: outliers under a pre-set scale -> +-max
            out[r0:r1, c0:c1].copy_(t)  # round to nearest even

    @torch.no_grad()
    def quantize(self, w, *, name=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Quantize a whole tensor of rank >= 2; returns (q, scale). NonFiniteError on NaN/Inf."""
        amax = torch.empty(self.scheme.scale_shape(w.shape), device=w.device,
                           dtype=torch.float32)
        mats = _matrices(w)  # after scale_shape rejected rank < 2
        for idx, m in mats:
            amax[idx].copy_(self.amax_2d(m).reshape(amax[idx].shape))
        if not check_finite(amax):  # one sync for all experts
            raise NonFiniteError(f"tensor {name or '<unnamed>'!r} ({w.dtype}, shape {list(w.shape)}) "
                                 f"holds NaN or +-Inf; cannot compute an fp8 scale (fix or skip it)")
        scale = self.scale(amax, w.dtype)
        q = torch.empty(w.shape, dtype=self.fp8_dtype, device=w.device)
        for idx, m in mats:
            self.quantize_2d_into(m, scale[idx], q[idx])
        return q, scale


def scale_dtype_of(scale_dtype: str, weight_dtype: torch.dtype) -> torch.dtype:
    """The dtype of a ``weight_dtype`` weight's scale under ``scale_dtype`` ("float32" | "weight")."""
    return torch.float32 if scale_dtype == "float32" else weight_dtype


def _scratch_as(buf, dtype) -> torch.Tensor:
    """The float32 scratch as ``dtype`` elements (bf16 / fp16: twice as many; float64: half)."""
    n = buf.numel() * 4 // dtype.itemsize
    return buf.view(torch.uint8)[: n * dtype.itemsize].view(dtype)


def _matrices(w) -> list[tuple[tuple[int, ...], torch.Tensor]]:
    """(index, 2-D view) for every matrix over w's leading dims; views, never copies."""
    return [((), w)] if w.dim() == 2 else [((i, *j), m) for i in range(len(w)) for j, m in _matrices(w[i])]


def _dequantized_pieces(q, scale, scheme: Scheme):
    """Yield (matrix index, (row slice, col slice), float32 dequantized piece) over q."""
    want = scheme.scale_shape(q.shape)
    if tuple(scale.shape) != want:
        raise OptionsError(f"scale shape {list(scale.shape)} does not match {list(want)} for {list(q.shape)}")
    for idx, m in _matrices(q) if q.numel() else ():
        (br, bc), sg = scheme.granule(*m.shape), _as_grid(scale[idx])
        for r0, r1, c0, c1 in _pieces(*m.shape, br, bc, default_scratch_elems(q.device)):
            d = m[r0:r1, c0:c1].to(torch.float32)
            _apply_grid(d, sg, br, bc, torch.Tensor.mul_, r0, c0)
            yield idx, (slice(r0, r1), slice(c0, c1)), d


@torch.no_grad()
def quantize(w, granularity="tensor", fp8_dtype=torch.float8_e4m3fn, block_size=DEFAULT_BLOCK, *, name=None,
             scale_dtype: str = "float32"):
    """(fp8 q, scale) of ``w`` (rank >= 2) under a scheme; the scale is float32, or w's dtype
    with ``scale_dtype="weight"``; see ``Quantizer.quantize``."""
    return Quantizer(fp8_dtype, granularity, block_size, w.device,
                     min(max(w.numel(), 1), default_scratch_elems(w.device)),
                     scale_dtype).quantize(w, name=name)


@torch.no_grad()
def dequantize(q, scale, granularity, block_size=DEFAULT_BLOCK, dtype=torch.float32) -> torch.Tensor:
    """``dtype(float32(q) * scale)`` under the scheme ``q`` was quantized with; q's shape."""
    out = torch.empty(q.shape, dtype=dtype, device=q.device)
    for idx, sl, d in _dequantized_pieces(q, scale, as_scheme(granularity, block_size)):
        out[idx][sl] = d
    return out


@torch.no_grad()
def relative_error(w, q, scale, granularity, block_size=DEFAULT_BLOCK) -> float:
    """||w - dequantize(q, scale)|| / ||w|| (0.0 when ||w|| == 0): float64 sums, in pieces."""
    if w.shape != q.shape:
        raise OptionsError(f"w shape {list(w.shape)} differs from q shape {list(q.shape)}")
    num = torch.zeros((), dtype=torch.float64, device=w.device)
    den = num.clone()
    for idx, sl, d in _dequantized_pieces(q, scale, as_scheme(granularity, block_size)):
        wp = w[idx][sl].to(torch.float64)
        num += (d.double() - wp).square().sum()
        den += wp.square().sum()
    return 0.0 if float(den) == 0 else math.sqrt(float(num) / float(den))
