"""Several trained models predicting as one: the folds of a k-fold cross-validation, as nnU-Net
predicts with `-f 0 1 2 3 4`.

nnunetv2's predictor sums each fold's sliding-window logits and divides by the number of folds
before the softmax; `FoldEnsemble` does the same per window, so the sliding-window stitching,
mirroring and resampling that follow treat the ensemble as one model.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from nnmamba.checkpoint import load_bundle

_CONTRACT = ("task", "in_channels", "out_channels")   # what every member must share to be averaged


class FoldEnsemble(nn.Module):
    """The mean of its members' outputs (logits, heatmaps), accumulated one member at a time so the
    peak memory is that of one member's output more than a single model's."""

    def __init__(self, members: Sequence[nn.Module]):
        super().__init__()
        if not members:
            raise ValueError("FoldEnsemble needs at least one member")
        self.members = nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        total = self.members[0](x)
        for member in self.members[1:]:
            total = total + member(x)
        return total / len(self.members)


def load_models(directories: Sequence[str | Path], device: torch.device | str = "cpu") -> tuple[nn.Module, dict]:
    """One bundle's model, or the `FoldEnsemble` of several, and the (first) architecture record.

    Bundles that do not predict the same thing (task, input channels, output channels) are refused,
    naming the one that differs.
    """
    if not directories:
        raise ValueError("load_models needs at least one model bundle")
    loaded = [load_bundle(Path(directory), device) for directory in directories]
    if len(loaded) == 1:
        return loaded[0]
    first = loaded[0][1]
    for directory, (_, arch) in zip(directories[1:], loaded[1:]):
        differs = [key for key in _CONTRACT if arch.get(key) != first.get(key)]
        if differs:
            raise ValueError(f"{directory} cannot join an ensemble with {directories[0]}: its "
                             + ", ".join(f"{key} is {arch.get(key)!r}, not {first.get(key)!r}" for key in differs))
    return FoldEnsemble([model for model, _ in loaded]).to(device).eval(), first
