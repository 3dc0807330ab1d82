"""The experiment plan derived from a dataset fingerprint, nnU-Net style, and the preprocessing it fixes.

Rules (nnU-Net v2's, simplified where noted):

- Target spacing: the median spacing per axis. If the data are strongly anisotropic (the
  coarsest axis more than ``anisotropy_threshold`` times the finest, AND that many times fewer
  voxels along it), the coarse axis takes the 10th percentile of its spacings instead, so
  resampling does not invent slices between thick ones.
- Normalisation, per channel: a channel named "CT" is clipped to the 0.5-99.5 percentiles of the
  dataset's foreground intensities, then z-scored with the foreground mean and std (HU are
  comparable across scans). Any other channel is z-scored per image: inside the nonzero mask
  (0 outside) when cropping to that mask shrinks the median image by at least
  ``nonzero_mask_threshold`` (skull-stripped brains: BraTS), over the whole image otherwise.
- Patch size: start from a box of ``initial_patch_edge``^3 voxels shaped by the target spacing
  (equal extent in mm per axis), clip it to the median image shape at the target spacing,
  round every axis up to a multiple of 16 (the network downsamples 4 times); then, while one
  training batch of ``min_batch_size`` would exceed the memory budget, shrink by 16 the axis
  whose patch is largest relative to the median shape.
- Batch size: as many as fit the budget, within [min_batch_size, max_batch_size], and covering at
  most ``max_batch_dataset_fraction`` of the dataset's voxels (never below the minimum).

Memory comes from a measured model (``nnmamba.complexity.TrainingMemory``), not a constant: what
autograd keeps for the backward pass of the largest variant, plus weights, gradients and Adam's two
moments. nnU-Net's separate-z resampling of anisotropic data is left out: torchio resamples all
axes with one interpolator.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

PATCH_MULTIPLE = 16
NORMALIZATION_SCHEMES = ("ct", "zscore", "nonzero_zscore")
IMAGE_INTERPOLATIONS = ("linear", "bspline")
ANISOTROPIC_PERCENTILE = 10
# Spacings this close (relative) to the target are not resampled: resampling 1 mm onto 1 mm
# would only blur.
SPACING_RTOL = 1e-3
GIB = 1024**3


@dataclass(frozen=True)
class ChannelNormalization:
    """How one channel is normalised; ``clip``, ``mean`` and ``std`` are the dataset's (CT only)."""

    scheme: str
    clip: tuple[float, float] | None = None
    mean: float | None = None
    std: float | None = None

    def __post_init__(self) -> None:
        if self.scheme not in NORMALIZATION_SCHEMES:
            raise ValueError(f"unknown normalisation {self.scheme!r}; known: {list(NORMALIZATION_SCHEMES)}")
        if self.scheme == "ct" and (self.clip is None or self.mean is None or not self.std):
            raise ValueError("CT normalisation needs the dataset's clip range, mean and a positive std")


@dataclass(frozen=True)
class Preprocessing:
    """How a raw case becomes network input: per-channel normalisation and resampling.

    The crop margin around the nonzero region is the pipeline's ``prepare.crop_margin``
    (also recorded in the plan), passed beside this.
    """

    normalization: tuple[ChannelNormalization, ...]
    target_spacing: tuple[float, float, float] | None = None
    image_interpolation: str = "linear"

    def __post_init__(self) -> None:
        if self.image_interpolation not in IMAGE_INTERPOLATIONS:
            raise ValueError(
                f"unknown image interpolation {self.image_interpolation!r}; known: {list(IMAGE_INTERPOLATIONS)}"
            )

    @classmethod
    def head_mask(cls, n_channels: int) -> Preprocessing:
        """BraTS preprocessing: every channel z-scored inside the nonzero (head) mask, native spacing."""
        return cls(tuple(ChannelNormalization("nonzero_zscore") for _ in range(n_channels)))

    @classmethod
    def from_plan(cls, plan: Mapping) -> Preprocessing:
        """The preprocessing a plan (``make_plan``'s JSON) prescribes."""
        return cls(
            normalization=tuple(
                ChannelNormalization(n["scheme"], tuple(n["clip"]) if n.get("clip") else None, n.get("mean"),
                                     n.get("std"))
                for n in plan["normalization"]
            ),
            target_spacing=tuple(plan["target_spacing"]) if plan.get("target_spacing") else None,
            image_interpolation=plan["image_interpolation"],
        )

    def needs_resampling(self, spacing: Sequence[float]) -> bool:
        """Whether an image of ``spacing`` (canonical axis order) is resampled to the target."""
        if self.target_spacing is None:
            return False
        return not np.allclose(spacing, self.target_spacing, rtol=SPACING_RTOL, atol=0)


@dataclass(frozen=True)
class PlanSettings:
    """The numbers of params.yaml's ``plan`` section."""

    memory_budget_gb: float
    target_spacing: str | Sequence[float] = "auto"
    anisotropy_threshold: float = 3.0
    nonzero_mask_threshold: float = 0.25
    initial_patch_edge: int = 256
    min_batch_size: int = 2
    max_batch_size: int = 2
    max_batch_dataset_fraction: float = 0.05


MemoryModel = Callable[[Sequence[int], int], float]


def make_plan(
    fingerprint: Mapping,
    settings: PlanSettings,
    training_memory: MemoryModel,
    crop_margin: int,
    image_interpolation: str = "linear",
) -> dict:
    """The JSON-serialisable plan; ``training_memory(patch, batch)`` estimates bytes for one training step."""
    spacings = np.array([c["spacing"] for c in fingerprint["cases"].values()])
    cropped = np.array([c["shape_after_crop"] for c in fingerprint["cases"].values()])
    target = _target_spacing(spacings, cropped, settings)
    median_shape = np.median(cropped * spacings / target, axis=0)
    patch = _patch_size(median_shape, target, settings, training_memory)
    batch = _batch_size(patch, median_shape, fingerprint["n_cases"], settings, training_memory)
    plan = {
        "target_spacing": [float(s) for s in target],
        "median_shape": [float(s) for s in median_shape],
        "normalization": _normalization(fingerprint, settings),
        "image_interpolation": image_interpolation,
        "crop_margin": int(crop_margin),
        "patch_size": [int(p) for p in patch],
        "batch_size": int(batch),
        "memory": {
            "budget_bytes": int(settings.memory_budget_gb * GIB),
            "estimated_bytes": int(training_memory(patch, batch)),
        },
    }
    Preprocessing.from_plan(plan)  # the plan must describe a valid preprocessing
    return plan


def _target_spacing(spacings: np.ndarray, cropped: np.ndarray, settings: PlanSettings) -> np.ndarray:
    if settings.target_spacing != "auto":
        target = np.asarray(settings.target_spacing, dtype=float)
        if target.shape != (3,) or not (target > 0).all():
            raise ValueError(
                f"plan.target_spacing must be 'auto' or three positive mm values, got {settings.target_spacing}"
            )
        return target
    target = np.median(spacings, axis=0)
    shape = np.median(cropped * spacings / target, axis=0)
    worst = int(np.argmax(target))
    others = [axis for axis in range(3) if axis != worst]
    threshold = settings.anisotropy_threshold
    if target[worst] > threshold * target.min() and shape[worst] * threshold < shape[others].min():
        coarse = np.percentile(spacings[:, worst], ANISOTROPIC_PERCENTILE)
        target[worst] = max(coarse, target[others].max() + 1e-5)
    return target


def _patch_size(median_shape: np.ndarray, target: np.ndarray, settings: PlanSettings,
                training_memory: MemoryModel) -> np.ndarray:
    inverse = 1.0 / target
    initial = inverse * (settings.initial_patch_edge**3 / np.prod(inverse)) ** (1 / 3)
    patch = np.minimum(initial, median_shape)
    patch = np.maximum(np.ceil(patch / PATCH_MULTIPLE), 1).astype(int) * PATCH_MULTIPLE
    budget = settings.memory_budget_gb * GIB
    while training_memory(patch, settings.min_batch_size) > budget:
        shrinkable = patch > PATCH_MULTIPLE
        if not shrinkable.any():
            needed = training_memory(patch, settings.min_batch_size) / GIB
            raise ValueError(
                f"plan.memory_budget_gb = {settings.memory_budget_gb} cannot hold a {PATCH_MULTIPLE}^3 patch at "
                f"batch {settings.min_batch_size}: that needs {needed:.2f} GiB"
            )
        ratios = np.where(shrinkable, patch / median_shape, -np.inf)
        patch[int(np.argmax(ratios))] -= PATCH_MULTIPLE
    return patch


def _batch_size(patch: np.ndarray, median_shape: np.ndarray, n_cases: int, settings: PlanSettings,
                training_memory: MemoryModel) -> int:
    budget = settings.memory_budget_gb * GIB
    batch = settings.min_batch_size
    while batch < settings.max_batch_size and training_memory(patch, batch + 1) <= budget:
        batch += 1
    dataset_voxels = n_cases * np.prod(median_shape)
    by_dataset = math.floor(settings.max_batch_dataset_fraction * dataset_voxels / np.prod(patch))
    return max(settings.min_batch_size, min(batch, by_dataset))


def _normalization(fingerprint: Mapping, settings: PlanSettings) -> list[dict]:
    use_mask = fingerprint["median_relative_size_after_crop"] <= 1 - settings.nonzero_mask_threshold
    schemes = []
    for channel in fingerprint["channels"]:
        if channel.casefold() == "ct":
            stats = fingerprint["foreground_intensity"][channel]
            schemes.append({"channel": channel, "scheme": "ct", "mean": stats["mean"], "std": max(stats["std"], 1e-8),
                            "clip": [stats["percentile_00_5"], stats["percentile_99_5"]]})
        else:
            schemes.append({"channel": channel, "scheme": "nonzero_zscore" if use_mask else "zscore"})
    return schemes
