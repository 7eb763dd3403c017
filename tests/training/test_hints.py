"""compactor/training/hints.py: a model's outputs as distillation sees them, in the order the
ONNX export emits them."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pytest
import torch

from compactor.exporting import flatten_outputs
from compactor.training.hints import output_tensors


@pytest.mark.parametrize("shape", ["tensor", "tuple", "dict", "nested", "with none"])
def test_output_tensors_follow_the_export_order(shape):
    a, b, c = torch.randn(2, 3), torch.randn(2, 4), torch.randn(2, 5, 2)
    out = {
        "tensor": a,
        "tuple": (a, b, c),
        "dict": OrderedDict(logits=a, box=b, points=c),
        "nested": (a, {"box": b, "more": [c]}),
        "with none": (a, None, b),
    }[shape]
    got = output_tensors(out)
    want = flatten_outputs(out)
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert isinstance(g, torch.Tensor)
        np.testing.assert_array_equal(g.numpy(), w)


def test_output_tensors_keep_gradients():
    x = torch.randn(2, 3, requires_grad=True)
    (y, z) = output_tensors({"y": x * 2, "z": x.sum(1)})
    (y.sum() + z.sum()).backward()
    assert x.grad is not None
