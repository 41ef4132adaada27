"""Every dtype the safetensors format defines, and how each travels in torch.

One table: the format's name -> bits per element (known without torch, so header sizes never
depend on the torch version) and the torch dtype that holds it, looked up in the installed torch as
safetensors' torch.py does. A dtype the installed torch lacks travels as its bytes (RAW_DTYPE).
"""

from __future__ import annotations

import math

import torch

__all__ = ["BITS", "DTYPES", "RAW_DTYPE", "FLOATS", "FP8", "WIDE_FLOATS", "dtype_name", "torch_dtype_of",
           "torch_shape", "nbytes_of"]

# Every dtype the safetensors format defines (its Rust ``Dtype`` enum, in that order): the bits
# per element, and the name of the torch dtype that holds it, looked up in the installed torch
# as safetensors' torch.py does (getattr(torch, ..., None)). Bit widths are the format's, known
# without torch: header sizes never depend on the torch version. F4 travels as torch's
# float4_e2m1fn_x2 (two F4 values per byte element), as safetensors.safe_open gives it.
_FORMAT: dict[str, tuple[int, str | None]] = {
    "BOOL": (8, "bool"), "F4": (4, "float4_e2m1fn_x2"), "F6_E2M3": (6, None), "F6_E3M2": (6, None),
    "U8": (8, "uint8"), "I8": (8, "int8"), "F8_E5M2": (8, "float8_e5m2"), "F8_E4M3": (8, "float8_e4m3fn"),
    "F8_E8M0": (8, "float8_e8m0fnu"), "F8_E4M3FNUZ": (8, "float8_e4m3fnuz"),
    "F8_E5M2FNUZ": (8, "float8_e5m2fnuz"), "I16": (16, "int16"), "U16": (16, "uint16"),
    "F16": (16, "float16"), "BF16": (16, "bfloat16"), "I32": (32, "int32"), "U32": (32, "uint32"),
    "F32": (32, "float32"), "C64": (64, "complex64"), "F64": (64, "float64"), "I64": (64, "int64"),
    "U64": (64, "uint64"),
}
BITS: dict[str, int] = {name: bits for name, (bits, _) in _FORMAT.items()}
# safetensors name -> torch dtype, for the names the installed torch can hold
DTYPES: dict[str, torch.dtype] = {name: getattr(torch, attr) for name, (_, attr) in _FORMAT.items()
                                  if attr is not None and isinstance(getattr(torch, attr, None), torch.dtype)}
RAW_DTYPE = torch.uint8   # what a dtype torch lacks travels as: its bytes
# Floating-point names the installed torch holds (F4, every FP8, F16, BF16, F32, F64)
FLOATS = frozenset(n for n, d in DTYPES.items() if d.is_floating_point)
# The FP8 mmapload writes, and pairs with a scale when a source holds it: OCP e4m3fn and e5m2, the
# two torch computes with (fp8.FP8_DTYPES); not the FNUZ variants, nor E8M0 (a scale format)
FP8 = frozenset(n for n in FLOATS if DTYPES[n] in (torch.float8_e4m3fn, torch.float8_e5m2))
# Floats wider than FP8: the dtypes worth quantizing (and, kept, worth listing as "ignored")
WIDE_FLOATS = frozenset(n for n in FLOATS if BITS[n] > 8)
_NAMES = {d: n for n, d in DTYPES.items()}


def dtype_name(dtype: torch.dtype) -> str:
    """The safetensors name of a torch dtype (``torch.bfloat16`` -> ``"BF16"``); ValueError if none."""
    try:
        return _NAMES[dtype]
    except KeyError:
        raise ValueError(f"dtype {dtype} has no safetensors name; known: {sorted(_NAMES.values())}") from None


def torch_dtype_of(dtype: str) -> torch.dtype:
    """The torch dtype a safetensors ``dtype`` travels as: its own, or RAW_DTYPE (bytes) where the
    installed torch has none (F6_E2M3, F6_E3M2; U16 / U32 / U64 before torch 2.3, ...)."""
    if dtype not in BITS:
        raise ValueError(f"unknown safetensors dtype {dtype!r}; known: {', '.join(BITS)}")
    return DTYPES.get(dtype, RAW_DTYPE)


def nbytes_of(dtype: str, shape) -> int:
    """Bytes of a safetensors ``dtype`` tensor of ``shape``, as safetensors computes them
    (elements x bits / 8); ValueError if that is no whole number of bytes (F4 / F6 only)."""
    bits = math.prod(shape) * BITS[dtype]
    if bits % 8:
        raise ValueError(f"{dtype} shape {list(shape)} holds {bits} bits, not a whole number of bytes")
    return bits // 8


def torch_shape(dtype: str, shape) -> tuple[int, ...]:
    """The shape a safetensors ``dtype`` tensor of ``shape`` has in torch (of ``torch_dtype_of``).

    Where one torch element holds one value, ``shape`` itself. Where it does not (F4 as
    float4_e2m1fn_x2, two values per byte; anything as RAW_DTYPE bytes), the last dim is scaled
    to torch elements when it holds a whole number of them (F4 [4096, 2880] -> [4096, 1440], as
    safetensors.safe_open gives it; F6 [64, 32] -> uint8 [64, 24]), else the tensor is 1-D of
    its element count (F4 [2, 3] -> [3]). Either way ``t.view(torch.uint8).flatten()`` is the
    file's bytes, and the header's dtype and shape (``TensorSpec``) say how to read them.
    """
    shape, bits = tuple(shape), BITS[dtype]
    per = torch_dtype_of(dtype).itemsize * 8   # bits per torch element
    if bits == per:
        return shape
    if shape and shape[-1] * bits % per == 0:
        return (*shape[:-1], shape[-1] * bits // per)
    return (nbytes_of(dtype, shape) * 8 // per,)
