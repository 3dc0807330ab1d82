"""Heatmap patch loader on a prepared synthetic landmark dataset: targets aligned with the image, sharding."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch

from nnmamba.data.loading.augmentation import Augmentation
from nnmamba.data.loading.heatmap_sampling import make_heatmap_loader
from nnmamba.data.preprocessing.landmarks import prepare_landmark_dataset
from nnmamba.data.readers.landmarks import LANDMARK_NAMES, find_landmark_cases
from nnmamba.data.synthetic.fetal import write_synthetic_fetal

PATCH = (16, 16, 16)
SIGMA = 3.0
SPACING = 2.0
ONLY_LANDMARKS = {0: 0.0, **{k: 1.0 for k in range(1, len(LANDMARK_NAMES) + 1)}}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> dict:
    raw = tmp_path_factory.mktemp("raw")
    write_synthetic_fetal(raw, n_cases=4, seed=5)
    out_dir = tmp_path_factory.mktemp("prepared") / "fetal"
    prepare_landmark_dataset(find_landmark_cases(raw), out_dir, LANDMARK_NAMES, (SPACING,) * 3, 2, progress=False)
    index = json.loads((out_dir / "dataset.json").read_text())
    return {"dir": out_dir, "index": index, "ids": sorted(index["cases"])}


def _loader(dataset: dict, ids: list[str], **overrides):
    cases = [dataset["index"]["cases"][c] for c in ids]
    arguments = dict(
        image_paths=[dataset["dir"] / c["image"] for c in cases],
        landmarks_mm=[[c["landmarks_mm"][n] for n in LANDMARK_NAMES] for c in cases],
        sigma_mm=SIGMA, patch_size=PATCH, batch_size=2, samples_per_volume=3, queue_length=6,
        label_probabilities=ONLY_LANDMARKS, augmentation=Augmentation(), num_workers=0, seed=0,
    )
    arguments.update(overrides)
    return make_heatmap_loader(**arguments)


def _reference(dataset: dict, case_id: str, location: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Image crop and brute-force Gaussians (world distance on the prepared grid) at a patch location."""
    entry = dataset["index"]["cases"][case_id]
    image = nib.load(dataset["dir"] / entry["image"])
    start, stop = location[:3].numpy(), location[3:].numpy()
    crop = np.asarray(image.dataobj, dtype=np.float32)[tuple(slice(a, b) for a, b in zip(start, stop))]
    voxels = np.stack(np.meshgrid(*[np.arange(a, b) for a, b in zip(start, stop)], indexing="ij"), axis=-1)
    world = voxels @ image.affine[:3, :3].T + image.affine[:3, 3]
    points = np.array([entry["landmarks_mm"][n] for n in LANDMARK_NAMES])
    squared = ((world[None] - points[:, None, None, None]) ** 2).sum(axis=-1)
    return crop, np.exp(-squared / (2 * SIGMA**2))


def test_patches_carry_their_targets_and_contain_a_landmark(dataset: dict) -> None:
    batches = list(_loader(dataset, dataset["ids"]))
    assert sum(len(b["case_id"]) for b in batches) == len(dataset["ids"]) * 3
    # The voxel nearest a landmark is at most half a voxel diagonal away: its target is at least this.
    nearest = np.exp(-3 * (SPACING / 2) ** 2 / (2 * SIGMA**2))
    for batch in batches:
        assert batch["image"].shape[1:] == (1, *PATCH) and batch["label"].dtype == torch.float32
        assert batch["label"].shape[1:] == (len(LANDMARK_NAMES), *PATCH)
        for image, heatmaps, location, case_id in zip(batch["image"], batch["label"], batch["location"],
                                                      batch["case_id"]):
            crop, targets = _reference(dataset, case_id, location)
            assert np.allclose(image[0].numpy(), crop, atol=1e-5)
            assert np.allclose(heatmaps.numpy(), targets, atol=1e-5)
            assert heatmaps.amax() >= nearest - 1e-6


def test_intensity_augmentation_leaves_the_targets_exact(dataset: dict) -> None:
    batch = next(iter(_loader(dataset, dataset["ids"], augmentation=Augmentation(gamma_p=1.0, noise_p=1.0))))
    for image, heatmaps, location, case_id in zip(batch["image"], batch["label"], batch["location"],
                                                  batch["case_id"]):
        crop, targets = _reference(dataset, case_id, location)
        assert not np.allclose(image[0].numpy(), crop, atol=1e-3)
        assert np.allclose(heatmaps.numpy(), targets, atol=1e-5)


def test_ranks_get_disjoint_cases_and_equal_epochs(dataset: dict) -> None:
    ids = dataset["ids"][:3]
    epochs = [list(_loader(dataset, ids, rank=rank, world_size=2)) for rank in (0, 1)]
    seen = [{c for batch in epoch for c in batch["case_id"]} for epoch in epochs]
    assert not seen[0] & seen[1] and seen[0] | seen[1] == set(ids)
    assert [sum(len(b["case_id"]) for b in epoch) for epoch in epochs] == [6, 6]
