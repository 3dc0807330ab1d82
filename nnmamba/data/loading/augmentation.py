"""The ``augmentation`` dict of params.yaml as torchio random transforms."""

from __future__ import annotations

from typing import Any

import torchio as tio

FLIP_KEYS = {"flip_axes": "axes"}
# augmentation probability key -> (torchio transform, {optional key: its keyword}, fixed keywords).
# Absent optional keys keep torchio's defaults; the probability is the transform's p.
RANDOM_TRANSFORMS: dict[str, tuple[type[tio.Transform], dict[str, str], dict[str, Any]]] = {
    # Preprocessed volumes are 0 outside the head, so resampling pads with 0 too.
    "affine_p": (tio.RandomAffine, {"scales": "scales", "degrees": "degrees"}, {"default_pad_value": 0}),
    # Intensity changes touch the network input only (landmark heatmap targets are images too).
    "gamma_p": (tio.RandomGamma, {"log_gamma": "log_gamma"}, {"include": ["image"]}),
    "noise_p": (tio.RandomNoise, {"noise_std": "std"}, {"include": ["image"]}),
}
AUGMENTATION_KEYS = frozenset(
    {"flip_p", *FLIP_KEYS, *RANDOM_TRANSFORMS, *(k for _, keys, _ in RANDOM_TRANSFORMS.values() for k in keys)}
)


def augmentation_transform(augmentation: dict, copy: bool = True) -> tio.Compose:
    """Random spatial then intensity transforms from a params.yaml ``augmentation`` dict.

    Keys: ``flip_p`` (per-axis flip probability) with ``flip_axes``; ``affine_p``
    with ``scales``, ``degrees``; ``gamma_p`` with ``log_gamma``; ``noise_p`` with
    ``noise_std``. A transform is used only when its probability is > 0, so an
    empty dict is the identity. Unknown keys raise ValueError. ``copy=False``: the transforms
    change the subject they are given instead of a deep copy (for subjects made to be transformed).
    """
    unknown = sorted(set(augmentation) - AUGMENTATION_KEYS)
    if unknown:
        raise ValueError(f"unknown augmentation key(s) {unknown}; known keys: {sorted(AUGMENTATION_KEYS)}")
    transforms: list[tio.Transform] = []
    if augmentation.get("flip_p", 0) > 0:
        kwargs = _present_keywords(augmentation, FLIP_KEYS)
        transforms.append(tio.RandomFlip(flip_probability=augmentation["flip_p"], copy=copy, **kwargs))
    for probability_key, (transform_type, keys, fixed) in RANDOM_TRANSFORMS.items():
        if augmentation.get(probability_key, 0) > 0:
            kwargs = _present_keywords(augmentation, keys)
            transforms.append(transform_type(p=augmentation[probability_key], copy=copy, **fixed, **kwargs))
    return tio.Compose(transforms, copy=copy)


def _present_keywords(augmentation: dict, keys: dict[str, str]) -> dict[str, Any]:
    """Keywords for the keys present; YAML lists become the tuples torchio expects."""
    return {
        keyword: tuple(augmentation[key]) if isinstance(augmentation[key], list) else augmentation[key]
        for key, keyword in keys.items()
        if key in augmentation
    }
