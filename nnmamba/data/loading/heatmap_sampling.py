"""Training patches for landmark detection: Gaussian heatmap targets and patches drawn around the landmarks.

Targets are made when a volume is loaded, from the case's world points, because sigma is a training
parameter, not a property of the prepared data. Per loaded volume the transforms run in this order:

1. one Gaussian heatmap per landmark on the image's grid (``gaussian_heatmaps``, sigma in mm);
2. zero-padding to at least the patch size;
3. augmentation: spatial transforms move the image and the heatmaps together; intensity transforms
   touch the image only (flips mirror anatomy and swap left/right landmarks, so landmark studies turn
   them off in params.yaml);
4. a sampling label map with label k+1 at the (augmented) peak voxel of landmark k and 0 elsewhere.

Patches are then drawn by :class:`ContainingLabelSampler` with ``label_probabilities`` over those
labels: ``{0: 1, 1: 1, ..., K: 1}`` centres a patch on each landmark, or on any voxel, equally often,
and a patch drawn for a landmark always contains it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchio as tio

from nnmamba.data.loading.augmentation import Augmentation, augmentation_transform
from nnmamba.data.loading.sampling import (ContainingLabelSampler, PatchBatchLoader, PatchDrawingDataset, Stack,
                                   case_id_of, patch_batch_loader, plain_stack, rank_shard)
from nnmamba.heatmaps import gaussian_heatmaps

HEATMAPS = "heatmaps"
PEAKS = "landmark_peaks"
POINTS = "landmarks_mm"


class AddGaussianHeatmaps(tio.Transform):
    """Add ``heatmaps`` (K channels) from the subject's ``landmarks_mm`` ([K, 3] RAS world mm)."""

    def __init__(self, sigma_mm: float, **kwargs: Any):
        super().__init__(**kwargs)
        self.sigma_mm = sigma_mm
        self.args_names = ["sigma_mm"]

    def apply_transform(self, subject: tio.Subject) -> tio.Subject:
        image = subject["image"]
        heatmaps = gaussian_heatmaps(subject[POINTS], image.affine, image.spatial_shape, self.sigma_mm)
        subject.add_image(tio.ScalarImage(tensor=heatmaps, affine=image.affine), HEATMAPS)
        return subject


class AddLandmarkPeaks(tio.Transform):
    """Add ``landmark_peaks``: label k+1 at the argmax voxel of heatmap k, 0 elsewhere (what patches are drawn around)."""

    def apply_transform(self, subject: tio.Subject) -> tio.Subject:
        heatmaps = subject[HEATMAPS]
        peaks = torch.zeros((1, *heatmaps.spatial_shape), dtype=torch.uint8)
        for channel, heatmap in enumerate(heatmaps.data):
            peaks[(0, *np.unravel_index(int(heatmap.argmax()), heatmap.shape))] = channel + 1
        subject.add_image(tio.LabelMap(tensor=peaks, affine=heatmaps.affine), PEAKS)
        return subject


def make_heatmap_loader(
    image_paths: list[Path],
    landmarks_mm: list[Sequence[Sequence[float]]],
    sigma_mm: float,
    patch_size: tuple[int, int, int],
    batch_size: int,
    samples_per_volume: int,
    queue_length: int,
    label_probabilities: dict[int, float],
    augmentation: Augmentation,
    num_workers: int,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    pin_memory: bool = False,
    passes: int | None = 1,
) -> PatchBatchLoader:
    """Loader of patch batches for one DDP rank; ``landmarks_mm[i]`` are image i's K points.

    Batches are dicts: ``image`` float32 [B, C, *patch_size], ``label`` float32 [B, K, *patch_size]
    (the heatmaps: the target the training step reads), ``location`` int64 [B, 6] and ``case_id``.
    Sharding, seeding and ``passes`` follow ``make_patch_loader``: equal patch counts per rank,
    batches that depend only on the seed.
    """
    if len(image_paths) != len(landmarks_mm):
        raise ValueError(f"{len(image_paths)} images but {len(landmarks_mm)} landmark sets")
    subjects = [
        tio.Subject(image=tio.ScalarImage(image), case_id=case_id_of(Path(image)),
                    **{POINTS: np.asarray(points, dtype=np.float64)})
        for image, points in rank_shard(list(zip(image_paths, landmarks_mm, strict=True)), rank, world_size)
    ]
    transform = tio.Compose([AddGaussianHeatmaps(sigma_mm), tio.CropOrPad(patch_size, only_pad=True),
                             augmentation_transform(augmentation), AddLandmarkPeaks()])
    sampler = ContainingLabelSampler(patch_size, label_name=PEAKS, label_probabilities=label_probabilities)
    dataset = PatchDrawingDataset(subjects, transform, sampler, samples_per_volume)
    return patch_batch_loader(dataset, len(image_paths), collate_heatmap_patches, batch_size, queue_length,
                              num_workers, seed, rank, world_size, pin_memory, passes)


def collate_heatmap_patches(patches: list[tio.Subject], stack: Stack = plain_stack) -> dict[str, Any]:
    """Plain tensors instead of torchio's nested per-image dicts; the heatmaps are the ``label``."""
    return {
        "image": stack("image", [patch["image"].data for patch in patches], torch.float32),
        "label": stack("label", [patch[HEATMAPS].data for patch in patches], torch.float32),
        "location": stack("location", [torch.as_tensor(patch[tio.LOCATION]) for patch in patches], torch.int64),
        "case_id": [patch["case_id"] for patch in patches],
    }
