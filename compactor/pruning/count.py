"""What pruning saves, counted on the torch model: parameters, and multiply-accumulates at
the shapes of real inputs (torch's own FLOP counter, which sees every matmul, conv and
attention product, as ONNX MAC counting does). The pipeline measures the exported model
again in ONNX; these counts steer a ``target`` and fill the prune stage's record."""

from __future__ import annotations

from torch import nn


def count_params(model: nn.Module) -> int:
    return int(sum(p.numel() for p in model.parameters()))


def count_macs(model: nn.Module, inputs: tuple | dict) -> int:
    """Multiply-accumulates of one forward pass on ``inputs``."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        if isinstance(inputs, dict):
            model(**inputs)
        else:
            model(*inputs)
    return int(counter.get_total_flops() // 2)
