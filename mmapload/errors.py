"""One exception family. Every failure mmapload detects is an ``MmapLoadError``.

``MmapLoadError`` subclasses ``ValueError`` so callers that already catch bad-input
errors keep working. Messages name the file, the tensor and the byte offsets
involved, and say what to do about it where there is something to do.
"""

from __future__ import annotations

import sys
import warnings

__all__ = [
    "MmapLoadError",
    "TPError",
    "CheckpointError",
    "CheckpointNotFoundError",
    "HeaderError",
    "ShardIndexError",
    "OptionsError",
    "NonFiniteError",
    "DeviceError",
    "FileChangedError",
    "MmapLoadWarning",
]


class MmapLoadError(ValueError):
    """Base class of every error mmapload raises on bad input or a failed load."""


class CheckpointError(MmapLoadError):
    """The path is not a checkpoint mmapload understands (no shards, wrong suffix)."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """The checkpoint path does not exist: an MmapLoadError, and a FileNotFoundError for code
    that catches that."""


class HeaderError(MmapLoadError):
    """A shard's safetensors header is malformed: length, JSON, dtype, shape or offsets."""


class ShardIndexError(MmapLoadError):
    """``model.safetensors.index.json`` disagrees with the shards it names."""


class OptionsError(MmapLoadError):
    """An option value is invalid, or too small for this checkpoint (e.g. ring_bytes)."""


class NonFiniteError(MmapLoadError):
    """A tensor that would be quantized holds NaN or +-Inf."""


class DeviceError(MmapLoadError):
    """The device cannot be used: CUDA missing, or out of memory while loading.

    After an out-of-memory error from ``stream_quantize(..., keep_partial=True)``,
    ``partial`` holds the ``QuantizedModel`` of the tensors loaded before it.
    """

    partial = None


class FileChangedError(MmapLoadError):
    """A shard changed (shrank, was truncated or replaced) while it was being read."""


class MmapLoadWarning(UserWarning):
    """Something was done differently from what was asked, for a reason the message gives."""


def warn(message: str) -> None:
    """An ``MmapLoadWarning`` attributed to the first frame outside mmapload: the user's line that
    called the verb (fixed stack levels break whenever a wrapper or a helper is added between)."""
    frame, level = sys._getframe(1), 2   # stacklevel 2: warn's caller
    while frame is not None and frame.f_globals.get("__name__", "").startswith("mmapload"):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, MmapLoadWarning, stacklevel=level)


class TPError(MmapLoadError):
    """A tensor cannot be cut for tensor parallelism as asked: tp_size does not divide a sharded
    dim or a fused part, kv heads cannot be replicated evenly, or a shard boundary is off the
    block-scale grid. The message names the tensor, its shape, the dim, tp_size and the fix."""

