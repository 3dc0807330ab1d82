"""Training losses, one per task, behind a single factory: ``build_loss(task, **kw)``.

Each task maps to a builder in ``_LOSS_BUILDERS``; a new task (classification, landmarks) adds one
builder and one registry entry. Keyword arguments go to the builder, so params.yaml can tune a loss
(e.g. ``lambda_dice``) without code edits.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from monai.losses import DiceCELoss
from torch import nn


def segmentation_loss(**kw: Any) -> nn.Module:
    """Dice + cross-entropy on logits [B, K, D, H, W] against int64 labels [B, 1, D, H, W] (nnU-Net's loss).

    The labels are one-hot encoded and the logits softmaxed inside the loss; ``kw`` overrides any
    other ``monai.losses.DiceCELoss`` argument.
    """
    return DiceCELoss(**{"to_onehot_y": True, "softmax": True, **kw})


def classification_loss(**kw: Any) -> nn.Module:
    """Cross-entropy on logits [B, K] against int64 class indices [B]; ``kw`` goes to ``nn.CrossEntropyLoss``.

    K logits rather than one sigmoid logit (the authors' BCE): the same loss then serves any number
    of classes, and for two classes the two are equivalent.
    """
    return nn.CrossEntropyLoss(**kw)


_LOSS_BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "segmentation": segmentation_loss,
    "classification": classification_loss,
}


def build_loss(task: str, **kw: Any) -> nn.Module:
    """The loss module for ``task``; ``kw`` is passed to that task's builder."""
    if task not in _LOSS_BUILDERS:
        known = ", ".join(sorted(_LOSS_BUILDERS))
        raise ValueError(f"unknown task {task!r} for build_loss; known tasks: {known}")
    return _LOSS_BUILDERS[task](**kw)
