"""Training losses, one per task, behind a single factory: ``build_loss(task, **kw)``.

Each task maps to a builder in ``_LOSS_BUILDERS``; a new task (classification, landmarks) adds one
builder and one registry entry. Keyword arguments go to the builder, so params.yaml can tune a loss
(e.g. ``lambda_dice``) without code edits.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn


class ContiguousLogits(nn.Module):
    """Hands `loss` a contiguous (NCDHW) copy of channels-last network output; same values, same gradient.

    Targets are contiguous (MONAI's one-hot labels, the Gaussian heatmaps); with channels_last_3d
    output every product and sum of a loss then mixes two memory layouts, which PyTorch runs on
    slow strided kernels (one such multiply took 1.5 ms per step at 2 x 16 x 128^3 on an H100).
    One copy of the output to the target's layout is far cheaper. Every task's loss gets it
    (`build_loss`); for contiguous output it is free.
    """

    def __init__(self, loss: nn.Module):
        super().__init__()
        self.loss = loss

    def forward(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.loss(prediction.contiguous(), target)


class DeepSupervision(nn.Module):
    """nnU-Net's deep supervision: for a list of outputs (full resolution first), `loss` against the target
    resized to each (nearest), weighted 1/2^i with the lowest resolution weighted 1e-6 (nnunetv2's
    trainer under DDP, which needs a gradient for every parameter; 0 on one GPU there) and the
    weights normalised to 1; a single output is scored as it is.

    Hand-written, not nnunetv2's DeepSupervisionWrapper: that takes targets its own data loader has
    already downsampled, and our loaders give one full-resolution target.
    """

    def __init__(self, loss: nn.Module):
        super().__init__()
        self.loss = loss

    def forward(self, prediction: torch.Tensor | list[torch.Tensor], target: torch.Tensor) -> torch.Tensor:
        if isinstance(prediction, torch.Tensor):
            return self.loss(prediction, target)
        weights = [1 / 2**i for i in range(len(prediction) - 1)] + [1e-6] if len(prediction) > 1 else [1.0]
        total = sum(weights)
        return sum((w / total) * self.loss(output, _resized(target, output.shape[2:]))
                   for w, output in zip(weights, prediction))


def _resized(target: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    if target.shape[2:] == shape:
        return target
    return nn.functional.interpolate(target.float(), size=shape, mode="nearest").to(target.dtype)


# The segmentation losses the backbones' published recipes train with (nnmamba.backbones.Recipe.loss).
SEGMENTATION_LOSSES = ("dice_ce", "dice", "ce")


class LabelCrossEntropy(nn.CrossEntropyLoss):
    """Cross-entropy on logits [B, K, D, H, W] against int64 label maps [B, 1, D, H, W] (the loaders' shape)."""

    def forward(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return super().forward(prediction, target[:, 0].long())


def segmentation_loss(terms: str = "dice_ce", **kw: Any) -> nn.Module:
    """A segmentation loss on logits [B, K, D, H, W] against int64 labels [B, 1, D, H, W].

    ``terms``: ``dice_ce``, Dice + cross-entropy (nnU-Net's loss; MONAI's BTCV tutorials), ``dice``
    (soft Dice over the one-hot labels, softmaxed logits), or ``ce`` (cross-entropy alone, as
    SegMamba's 3_train.py). ``kw`` overrides any other argument of the MONAI (or torch) loss.
    """
    # MONAI imported here, not at the top: `import monai` loads all of its submodules (seconds), and
    # the pipeline's lighter stages import this module only for SEGMENTATION_LOSSES.
    from monai.losses import DiceCELoss, DiceLoss

    if terms == "dice_ce":
        return DiceCELoss(**{"to_onehot_y": True, "softmax": True, **kw})
    if terms == "dice":
        return DiceLoss(**{"to_onehot_y": True, "softmax": True, **kw})
    if terms == "ce":
        return LabelCrossEntropy(**kw)
    raise ValueError(f"unknown segmentation loss {terms!r}; known: {', '.join(SEGMENTATION_LOSSES)}")


class WeightedHeatmapMSE(nn.Module):
    """Mean squared error between predicted and Gaussian target heatmaps, weighted 1 + (w - 1) * target per voxel.

    Why weighted: a landmark's Gaussian covers a few dozen voxels of a patch of tens of thousands, so
    plain MSE is nearly minimised by an all-zero output and the peaks get little gradient (the
    foreground/background imbalance Adaptive Wing loss, Wang et al. ICCV 2019, was designed for). The
    weight rises smoothly to ``foreground_weight`` at the peak, where the decoder reads the position;
    unlike Adaptive Wing's thresholded mask it needs no threshold, and unlike its log-shaped penalty it
    keeps MSE's optimum at the target itself, whose peak is the exact sub-voxel landmark.
    """

    def __init__(self, foreground_weight: float):
        super().__init__()
        if foreground_weight < 1:
            raise ValueError(f"foreground_weight must be >= 1 (1 = plain MSE), got {foreground_weight}")
        self.foreground_weight = foreground_weight

    def forward(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if prediction.shape != target.shape:
            raise ValueError(f"prediction {tuple(prediction.shape)} and target {tuple(target.shape)} differ in shape")
        weight = 1.0 + (self.foreground_weight - 1.0) * target
        return (weight * (prediction.float() - target) ** 2).mean()


def landmark_loss(**kw: Any) -> nn.Module:
    """Foreground-weighted MSE on Gaussian heatmaps [B, K, D, H, W] (``kw``: ``foreground_weight``)."""
    return WeightedHeatmapMSE(**kw)


def classification_loss(**kw: Any) -> nn.Module:
    """Cross-entropy on logits [B, K] against int64 class indices [B]; ``kw`` goes to ``nn.CrossEntropyLoss``.

    K logits rather than one sigmoid logit (the authors' BCE): the same loss then serves any number
    of classes, and for two classes the two are equivalent.
    """
    return nn.CrossEntropyLoss(**kw)


_LOSS_BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "segmentation": segmentation_loss,
    "landmark": landmark_loss,
    "classification": classification_loss,
}


def build_loss(task: str, **kw: Any) -> nn.Module:
    """The loss module for ``task``; ``kw`` is passed to that task's builder."""
    if task not in _LOSS_BUILDERS:
        known = ", ".join(sorted(_LOSS_BUILDERS))
        raise ValueError(f"unknown task {task!r} for build_loss; known tasks: {known}")
    loss = ContiguousLogits(_LOSS_BUILDERS[task](**kw))
    return DeepSupervision(loss) if task == "segmentation" else loss
