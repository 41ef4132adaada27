"""mmapload: stream safetensors checkpoints onto a device as FP8 with bounded memory.

    from mmapload import stream_quantize
    model = stream_quantize("path/to/checkpoint", "cuda:0", granularity="block")
"""

from .errors import (CheckpointError, CheckpointNotFoundError, DeviceError, FileChangedError, HeaderError,
                     MmapLoadError, MmapLoadWarning, NonFiniteError, OptionsError, ShardIndexError, TPError)
from .policy import QuantizedSourceError
from .fp8 import Granularity, PerBlock, PerChannel, PerTensor, Scheme
from .config import LoadConfig, LoadOptions, UnknownOptionError
from .result import LoadReport, QuantizedModel, QuantizedTensor
from .stream import iter_quantized, stream_quantize
from .converter import convert

__all__ = [
    "stream_quantize", "iter_quantized", "convert",
    "QuantizedModel", "QuantizedTensor", "LoadReport", "LoadConfig", "LoadOptions",
    "Granularity", "Scheme", "PerTensor", "PerChannel", "PerBlock",
    "MmapLoadError", "CheckpointError", "CheckpointNotFoundError", "HeaderError", "ShardIndexError", "OptionsError",
    "NonFiniteError", "DeviceError", "FileChangedError", "QuantizedSourceError", "TPError", "UnknownOptionError",
    "MmapLoadWarning",
]
__version__ = "0.1.0"
