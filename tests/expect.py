"""Shared expectations of the pipeline tests."""

import torch

from mmapload import QuantizedTensor
from mmapload.fp8 import quantize


def assert_same_as_whole_tensor_quantizer(got, tensors: dict, granularity: str) -> None:
    """Every FP8 tensor in ``got`` (a model or dict, any device) bit-identical to quantizing its
    whole source tensor at once; every other tensor equal to its source."""
    for name, w in tensors.items():
        t = got[name]
        if isinstance(t, QuantizedTensor):
            q, s = quantize(w, granularity)
            assert torch.equal(t.scale.cpu(), s), name
            assert torch.equal(t.data.cpu().view(torch.uint8), q.view(torch.uint8)), name
        else:
            assert torch.equal(t.cpu(), w), name
