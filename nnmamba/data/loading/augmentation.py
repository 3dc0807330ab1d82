"""Training augmentation settings as torchio random transforms."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torchio as tio


@dataclass(frozen=True)
class Augmentation:
    """Probabilities and ranges of the random transforms; a transform is used only when its p > 0.

    ``flip_p`` is the per-axis flip probability over ``flip_axes``; ``affine_p`` goes with
    ``scales`` and ``degrees``, ``gamma_p`` with ``log_gamma``, ``noise_p`` with ``noise_std``.
    A range left at None keeps torchio's default for it. The default is the identity.
    """

    flip_axes: tuple[int, ...] | None = None
    flip_p: float = 0.0
    affine_p: float = 0.0
    scales: float | tuple[float, ...] | None = None
    degrees: float | tuple[float, ...] | None = None
    gamma_p: float = 0.0
    log_gamma: float | tuple[float, ...] | None = None
    noise_p: float = 0.0
    noise_std: float | tuple[float, ...] | None = None


def augmentation_transform(augmentation: Augmentation, copy: bool = True) -> tio.Compose:
    """Flip, affine, gamma then noise, each only when its p > 0 (this order fixes the random streams).

    ``copy=False``: the transforms change the subject they are given instead of a deep copy
    (for subjects made to be transformed).
    """
    a = augmentation
    transforms: list[tio.Transform] = []
    if a.flip_p > 0:
        transforms.append(tio.RandomFlip(flip_probability=a.flip_p, copy=copy, **_given(axes=a.flip_axes)))
    if a.affine_p > 0:
        # Preprocessed volumes are 0 outside the head, so resampling pads with 0 too.
        transforms.append(tio.RandomAffine(p=a.affine_p, copy=copy, default_pad_value=0,
                                           **_given(scales=a.scales, degrees=a.degrees)))
    # Intensity changes touch the network input only (landmark heatmap targets are images too).
    if a.gamma_p > 0:
        transforms.append(tio.RandomGamma(p=a.gamma_p, copy=copy, include=["image"],
                                          **_given(log_gamma=a.log_gamma)))
    if a.noise_p > 0:
        transforms.append(tio.RandomNoise(p=a.noise_p, copy=copy, include=["image"], **_given(std=a.noise_std)))
    return tio.Compose(transforms, copy=copy)


def _given(**keywords: Any) -> dict[str, Any]:
    """The keywords set; None ones are left out so torchio keeps its defaults."""
    return {keyword: value for keyword, value in keywords.items() if value is not None}
