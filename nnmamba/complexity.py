"""Model size and compute: parameters, multiply-adds (as the paper's Table 2 counts them), training memory.

Multiply-adds come from PyTorch's own `torch.utils.flop_counter.FlopCounterMode` (FLOPs of
convolutions, linear layers and matrix products, halved to multiply-adds, as thop and fvcore
report "FLOPs"). Element-wise work (norms, activations, the selective scan's recurrence) is not
counted, as in those counters.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

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


@dataclass(frozen=True)
class MacModel:
    """Multiply-adds of one forward pass of a 1-sample input as a function of its patch size.

    Every counted operation of the dense networks is either per voxel (convolutions, the SSM's
    projections) or independent of the size (the SE MLPs of skip scaling), so the count is
    exactly affine in the number of voxels: ``constant + per_voxel * voxels``.
    """

    constant: float
    per_voxel: float

    def __call__(self, patch_size: Sequence[int]) -> int:
        return round(self.constant + self.per_voxel * math.prod(patch_size))


def measure_macs(model: nn.Module, in_channels: int) -> MacModel:
    """Fit the affine multiply-add count of a dense network from two small probes.

    Why probes: a CPU forward at the paper's 128^3 takes long on a laptop, and two small
    inputs determine the count exactly (see MacModel).
    """
    constant, per_voxel = _affine_in_voxels(*(count_macs(model, (1, in_channels, *probe)) for probe in _PROBES))
    return MacModel(constant=constant, per_voxel=per_voxel)


def _affine_in_voxels(small: float, large: float) -> tuple[float, float]:
    """(constant, per-voxel slope) of the line through the two probes' measurements."""
    per_voxel = (large - small) / (math.prod(_PROBES[1]) - math.prod(_PROBES[0]))
    return small - per_voxel * math.prod(_PROBES[0]), per_voxel


# Two input sizes divisible by the networks' total downsampling (16).
_PROBES = ((16, 16, 16), (16, 16, 32))
# Bytes per parameter during training: weights, gradients, and Adam's two moment estimates.
_TRAINING_COPIES_PER_PARAMETER = 4


@dataclass(frozen=True)
class TrainingMemory:
    """Bytes of one training step: fixed (parameters, gradients, Adam state) + per-sample activations.

    Activations are what autograd keeps for the backward pass; they are affine in the
    number of voxels of the patch (``per_sample_bytes + bytes_per_voxel * voxels``) and
    linear in the batch size.
    """

    fixed_bytes: float
    per_sample_bytes: float
    bytes_per_voxel: float

    def __call__(self, patch_size: Sequence[int], batch_size: int) -> float:
        return self.fixed_bytes + batch_size * (self.per_sample_bytes + self.bytes_per_voxel * math.prod(patch_size))


def measure_training_memory(model: nn.Module, in_channels: int) -> TrainingMemory:
    """Measure what a training forward pass keeps for backward, at two small sizes, and fit it.

    Saved tensors are counted once per storage (views share one) and the parameters'
    own storages are left out: they are counted in the fixed part. The probes run a
    batch of 2 (batch norm cannot train on one sample whose bottleneck is 1 voxel) and
    are halved.
    """
    parameter_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    per_sample, per_voxel = _affine_in_voxels(
        *(_saved_activation_bytes(model, (2, in_channels, *probe)) / 2 for probe in _PROBES))
    return TrainingMemory(
        fixed_bytes=float(_TRAINING_COPIES_PER_PARAMETER * parameter_bytes),
        per_sample_bytes=float(per_sample),
        bytes_per_voxel=float(per_voxel),
    )


def _saved_activation_bytes(model: nn.Module, input_shape: Sequence[int]) -> int:
    was_training = model.training
    model.train()
    device = next(model.parameters()).device
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(torch.zeros(*input_shape, device=device))
    model.train(was_training)
    return sum(storages.values())
