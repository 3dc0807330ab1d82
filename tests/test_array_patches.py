"""Unpacked case copies and patch-wise drawing and resampling, against brute-force and independent references."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torchio as tio
from scipy.ndimage import map_coordinates
from scipy.spatial.transform import Rotation

from nnmamba.data.loading.array_patches import ArrayPatchDataset, draw_voxels, read_region, resample_patch, rotation_matrix
from nnmamba.data.loading.augmentation import Augmentation
from nnmamba.data.errors import DataError
from nnmamba.data.loading.sampling import voxel_probabilities
from nnmamba.data.loading.unpacked import unpack_case

SHAPE = (20, 18, 16)


def _write_case(directory: Path, seed: int = 0, spacing: tuple = (1.0, 1.0, 1.0)) -> tuple[Path, Path]:
    rng = np.random.default_rng(seed)
    affine = np.diag([*spacing, 1.0])
    image, label = directory / "case.nii.gz", directory / "case-label.nii.gz"
    tio.ScalarImage(tensor=torch.from_numpy(rng.standard_normal((2, *SHAPE)).astype(np.float32)),
                    affine=affine).save(image)
    tio.LabelMap(tensor=torch.from_numpy(rng.integers(0, 4, (1, *SHAPE)).astype(np.uint8)), affine=affine).save(label)
    return image, label


def test_unpacked_copy_holds_the_case_and_its_voxels_sorted_by_label(tmp_path: Path) -> None:
    image_path, label_path = _write_case(tmp_path, spacing=(1.0, 1.5, 2.0))
    case = unpack_case("case", image_path, label_path, tmp_path / "unpacked")
    image, label = np.load(case.image), np.load(case.label)
    np.testing.assert_array_equal(image, tio.ScalarImage(image_path).data.numpy())
    np.testing.assert_array_equal(label, tio.LabelMap(label_path).data.numpy())
    assert case.shape == SHAPE and case.spacing == (1.0, 1.5, 2.0)
    assert list(case.label_counts) == np.bincount(label.ravel()).tolist()
    order = np.load(case.voxels_by_label)
    for value, (start, count) in enumerate(zip(case.label_starts, case.label_counts)):
        voxels = order[start:start + count]
        assert sorted(voxels.tolist()) == np.flatnonzero(label.ravel() == value).tolist()


def test_unpacked_copy_is_reused_until_its_source_changes(tmp_path: Path) -> None:
    image_path, label_path = _write_case(tmp_path)
    first = unpack_case("case", image_path, label_path, tmp_path / "unpacked")
    written = first.image.stat().st_mtime_ns
    assert unpack_case("case", image_path, label_path, tmp_path / "unpacked").image.stat().st_mtime_ns == written
    _write_case(tmp_path, seed=1)
    os.utime(image_path, ns=(written + 10**9, written + 10**9))
    again = unpack_case("case", image_path, label_path, tmp_path / "unpacked")
    np.testing.assert_array_equal(np.load(again.image), tio.ScalarImage(image_path).data.numpy())


def test_bad_cases_name_the_file(tmp_path: Path) -> None:
    image_path, label_path = _write_case(tmp_path)
    truncated = tmp_path / "truncated.nii.gz"
    truncated.write_bytes(image_path.read_bytes()[:300])
    with pytest.raises(DataError, match="truncated.nii.gz"):
        unpack_case("case", truncated, label_path, tmp_path / "unpacked")
    other_grid = tmp_path / "small-label.nii.gz"
    tio.LabelMap(tensor=torch.zeros(1, 4, 4, 4, dtype=torch.uint8)).save(other_grid)
    with pytest.raises(DataError, match="small-label.nii.gz has shape"):
        unpack_case("case", image_path, other_grid, tmp_path / "unpacked")
    with pytest.raises(DataError, match="missing.nii.gz"):
        unpack_case("case", tmp_path / "missing.nii.gz", label_path, tmp_path / "unpacked")
    nan_image = tmp_path / "nan.nii.gz"
    data = tio.ScalarImage(image_path).data.clone()
    data[1, 3, 4, 5] = float("nan")
    tio.ScalarImage(tensor=data).save(nan_image)
    with pytest.raises(DataError, match="nan.nii.gz contains 1 NaN/inf voxels"):
        unpack_case("case", nan_image, label_path, tmp_path / "unpacked")
    negative = tmp_path / "negative-label.nii.gz"
    tio.LabelMap(tensor=-torch.ones(1, *SHAPE, dtype=torch.int16)).save(negative)
    with pytest.raises(DataError, match="negative-label.nii.gz has negative values"):
        unpack_case("case", image_path, negative, tmp_path / "unpacked")
    assert not list((tmp_path / "unpacked").rglob("*.npy")), "a failed case left arrays behind"


@pytest.mark.parametrize("weights", [{0: 0.5, 1: 2.0, 2: 0.0, 5: 1.0}, None])
def test_drawn_voxels_follow_torchios_label_sampler_rule(tmp_path: Path, weights: dict | None) -> None:
    """Each voxel's frequency over many draws matches the probability map torchio's rule gives it."""
    image_path, label_path = _write_case(tmp_path)
    case = unpack_case("case", image_path, label_path, tmp_path / "unpacked")
    label = torch.from_numpy(np.load(case.label))
    expected = (label > 0).double() if weights is None else voxel_probabilities(label, weights)
    expected = (expected / expected.sum()).flatten().numpy()
    torch.manual_seed(0)
    draws = 400_000
    voxels = draw_voxels(case, np.load(case.voxels_by_label), weights, draws)
    observed = np.bincount(np.ravel_multi_index(voxels.T, SHAPE), minlength=label.numel()) / draws
    assert (observed[expected == 0] == 0).all()
    assert np.abs(observed - expected).max() < 5 * np.sqrt(expected.max() / draws)


def test_missing_weighted_labels_are_a_clear_error(tmp_path: Path) -> None:
    image_path, label_path = _write_case(tmp_path)
    case = unpack_case("case", image_path, label_path, tmp_path / "unpacked")
    with pytest.raises(DataError, match="none of the labels weighted"):
        draw_voxels(case, np.load(case.voxels_by_label), {7: 1.0}, 3)


def test_rotation_matrix_matches_scipy_extrinsic_euler_angles() -> None:
    degrees = np.array([7.0, -4.0, 10.0])
    np.testing.assert_allclose(rotation_matrix(degrees), Rotation.from_euler("xyz", degrees, degrees=True).as_matrix(),
                               atol=1e-12)


def test_region_reads_zero_fill_outside_the_volume() -> None:
    volume = np.arange(2 * 4 * 5 * 6, dtype=np.float32).reshape(2, 4, 5, 6)
    padded = np.pad(volume, ((0, 0), (3, 3), (3, 3), (3, 3)))
    start, stop = np.array([-2, 1, 3]), np.array([3, 7, 5])
    np.testing.assert_array_equal(read_region(volume, start, stop), padded[:, 1:6, 4:10, 6:8])
    np.testing.assert_array_equal(read_region(volume, np.array([0, 1, 2]), np.array([4, 3, 6])), volume[:, :, 1:3, 2:])


@pytest.mark.parametrize("angles,scales", [((0, 0, 90), (1, 1, 1)), ((7, -4, 10), (0.9, 1.1, 1.05))])
def test_resampled_patch_matches_scipy_map_coordinates(angles: tuple, scales: tuple) -> None:
    """An independent reference: scipy's spline interpolation (order 1 for images, 0 for labels), zeros outside."""
    rng = np.random.default_rng(0)
    image = rng.standard_normal((2, 30, 28, 26)).astype(np.float32)
    label = rng.integers(0, 5, (1, 30, 28, 26)).astype(np.uint8)
    origin, patch = np.array([10, -3, 12]), np.array([16, 14, 12])
    matrix = Rotation.from_euler("xyz", angles, degrees=True).as_matrix() @ np.diag(1 / np.asarray(scales))
    ours_image, ours_label = resample_patch(image, label, origin, patch, matrix)
    offsets = np.stack(np.meshgrid(*[np.arange(p) - (p - 1) / 2 for p in patch], indexing="ij"), -1)
    points = (origin + (patch - 1) / 2 + offsets @ matrix.T).reshape(-1, 3).T
    for channel in range(2):
        reference = map_coordinates(image[channel], points, order=1, mode="grid-constant", cval=0.0)
        np.testing.assert_allclose(ours_image[channel].numpy().ravel(), reference, atol=2e-4)
    reference = map_coordinates(label[0], points, order=0, mode="grid-constant", cval=0)
    assert ours_label.dtype == torch.uint8
    assert (ours_label[0].numpy().ravel() == reference).mean() > 0.999  # rounding ties may differ


def test_patch_affine_runs_per_patch_and_no_rotation_is_a_plain_crop(tmp_path: Path) -> None:
    image_path, label_path = _write_case(tmp_path)
    cases = [("case", image_path, label_path)]

    def patches(augmentation: Augmentation) -> list[tio.Subject]:
        torch.manual_seed(3)
        dataset = ArrayPatchDataset(cases, tmp_path / "unpacked", (8, 8, 8), 6, {1: 1.0, 2: 1.0}, augmentation)
        return dataset[0]

    identity = Augmentation(affine_p=1.0, scales=(1.0, 1.0), degrees=0)
    dataset = ArrayPatchDataset(cases, tmp_path, (8, 8, 8), 1, None, identity)
    assert isinstance(dataset.affine, tio.RandomAffine) and dataset.patch_transform.transforms == []
    volume = np.load(unpack_case("case", image_path, label_path, tmp_path / "unpacked").image)
    plain, resampled = patches(Augmentation()), patches(identity)
    for a, b in zip(plain, resampled, strict=True):
        i0, j0, k0, i1, j1, k1 = a[tio.LOCATION].tolist()
        assert torch.equal(a["image"].data, torch.from_numpy(volume[:, i0:i1, j0:j1, k0:k1]))
        torch.testing.assert_close(b["image"].data, a["image"].data, rtol=0, atol=1e-5)
        assert torch.equal(b["label"].data, a["label"].data)
    rotated = patches(Augmentation(affine_p=1.0, degrees=30))
    assert not any(torch.equal(a["label"].data, b["label"].data) for a, b in zip(plain, rotated))

    def is_plain_crop(patch: tio.Subject) -> bool:
        i0, j0, k0, i1, j1, k1 = patch[tio.LOCATION].tolist()
        return torch.equal(patch["image"].data, torch.from_numpy(volume[:, i0:i1, j0:j1, k0:k1]))

    # Drawn per patch: one item (6 patches of one case) mixes plain crops and resampled patches.
    coin = [is_plain_crop(patch) for patch in patches(Augmentation(affine_p=0.5, degrees=30))]
    assert any(coin) and not all(coin)
    flip_all = Augmentation(flip_axes=(0, 1, 2), flip_p=1.0)
    for a, b, c in zip(plain, patches(flip_all), patches(replace(identity, flip_axes=flip_all.flip_axes, flip_p=flip_all.flip_p)), strict=True):
        assert torch.equal(b["image"].data, torch.flip(a["image"].data, dims=[1, 2, 3]))
        assert torch.equal(b["label"].data, torch.flip(a["label"].data, dims=[1, 2, 3]))
        torch.testing.assert_close(c["image"].data, b["image"].data, rtol=0, atol=1e-5)
        assert torch.equal(c["label"].data, b["label"].data)


def test_only_the_listed_axes_flip(tmp_path: Path) -> None:
    image_path, label_path = _write_case(tmp_path)
    torch.manual_seed(0)
    dataset = ArrayPatchDataset([("case", image_path, label_path)], tmp_path / "unpacked", (8, 8, 8), 1, None,
                                Augmentation(flip_axes=(1,), flip_p=0.5))
    assert {dataset._flipped_axes() for _ in range(50)} == {(), (1,)}
    with pytest.raises(ValueError, match="axis indices"):
        ArrayPatchDataset([], tmp_path, (8, 8, 8), 1, None, Augmentation(flip_axes=("LR",), flip_p=0.5))
