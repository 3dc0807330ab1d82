"""Model size and compute: parameters and multiply-adds, counted the way the paper's Table 2 counts them.

Multiply-adds come from PyTorch's own `torch.utils.flop_counter.FlopCounterMode` (FLOPs of
convolutions, linear layers and matrix products, halved to multiply-adds, as thop and fvcore
report "FLOPs"). Element-wise work (norms, activations, the selective scan's recurrence) is not
counted, as in those counters.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def count_macs(model: nn.Module, input_shape: Sequence[int]) -> int:
    """Multiply-adds of one forward pass on a zero input of `input_shape` (batch included)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.zeros(*input_shape, device=device))
    model.train(was_training)
    return counter.get_total_flops() // 2
