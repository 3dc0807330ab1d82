"""Gaussian heatmap targets and their decoding to world points, against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from nnmamba.heatmaps import decode_heatmaps, gaussian_heatmaps, heatmap_peaks, voxel_to_world, world_to_voxel

# Voxel axes permuted and flipped (a 90 degree rotation), anisotropic spacing (2, 0.5, 3 mm), an offset:
# world x = -2 j + 10, world y = 0.5 i - 5, world z = 3 k + 1.
AFFINE = np.array([[0.0, -2.0, 0.0, 10.0], [0.5, 0.0, 0.0, -5.0], [0.0, 0.0, 3.0, 1.0], [0.0, 0.0, 0.0, 1.0]])


def test_voxel_world_round_trip_by_hand() -> None:
    assert voxel_to_world(AFFINE, [2.3, 1.0, 1.0]) == pytest.approx([8.0, -3.85, 4.0])
    assert world_to_voxel(AFFINE, [8.0, -3.85, 4.0]) == pytest.approx([2.3, 1.0, 1.0])


def test_gaussian_value_is_the_world_distance_gaussian() -> None:
    heatmaps = gaussian_heatmaps(np.array([[6.0, -3.0, 1.0]]), AFFINE, (4, 5, 3), sigma_mm=2.0)
    assert heatmaps.shape == (1, 4, 5, 3) and heatmaps.dtype == torch.float32
    # voxel (1, 2, 0) -> world (6, -4.5, 1): 1.5 mm from the point, exp(-2.25 / 8)
    assert float(heatmaps[0, 1, 2, 0]) == pytest.approx(math.exp(-2.25 / 8), rel=1e-6)
    # voxel (0, 0, 0) -> world (10, -5, 1): d^2 = 16 + 4 = 20, exp(-20 / 8)
    assert float(heatmaps[0, 0, 0, 0]) == pytest.approx(math.exp(-20 / 8), rel=1e-6)
    # voxel (3, 0, 2) -> world (10, -3.5, 7): d^2 = 16 + 0.25 + 36
    assert float(heatmaps[0, 3, 0, 2]) == pytest.approx(math.exp(-52.25 / 8), rel=1e-6)


def test_sigma_must_be_positive() -> None:
    with pytest.raises(ValueError, match="sigma"):
        gaussian_heatmaps(np.zeros((1, 3)), np.eye(4), (2, 2, 2), sigma_mm=0.0)


def test_three_value_peak_decodes_to_the_hand_computed_world_point() -> None:
    """log h at i = 1, 2, 3 is -1.3^2/2, -0.3^2/2, -0.7^2/2: the parabola's vertex is i = 2.3 exactly."""
    heatmap = torch.zeros(1, 5, 3, 3)
    for i, distance in ((1, 1.3), (2, 0.3), (3, 0.7)):
        heatmap[0, i, 1, 1] = math.exp(-distance**2 / 2)
    # The other axes have zero neighbours on both sides: symmetric, so no shift along them.
    assert heatmap_peaks(heatmap)[0] == pytest.approx([2.3, 1.0, 1.0], abs=1e-6)
    assert decode_heatmaps(heatmap, AFFINE)[0] == pytest.approx([8.0, -3.85, 4.0], abs=1e-5)


def _brute_force_gaussian(point: np.ndarray, affine: np.ndarray, shape: tuple[int, ...], sigma: float) -> torch.Tensor:
    values = np.zeros(shape)
    for index in np.ndindex(*shape):
        world = affine[:3, :3] @ np.asarray(index) + affine[:3, 3]
        values[index] = math.exp(-float(np.sum((world - point) ** 2)) / (2 * sigma**2))
    return torch.from_numpy(values)[None]


def test_sub_voxel_gaussian_peak_decodes_exactly_under_an_oblique_anisotropic_affine() -> None:
    rotation = np.array([[np.cos(0.4), -np.sin(0.4), 0.0], [np.sin(0.4), np.cos(0.4), 0.0], [0.0, 0.0, 1.0]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag([0.8, 1.2, 2.5])
    affine[:3, 3] = [-12.0, 7.5, 30.0]
    voxel = np.array([4.37, 3.62, 2.81])
    point = affine[:3, :3] @ voxel + affine[:3, 3]
    heatmap = _brute_force_gaussian(point, affine, (9, 8, 6), sigma=2.0)
    assert decode_heatmaps(heatmap, affine)[0] == pytest.approx(point, abs=1e-6)


def test_peak_on_the_border_is_not_refined_and_zero_heatmaps_stay_finite() -> None:
    heatmap = torch.zeros(2, 4, 4, 4)
    heatmap[0, 0, 2, 3] = 1.0
    heatmap[0, 1, 2, 3] = 0.9
    peaks = heatmap_peaks(heatmap)
    assert peaks[0] == pytest.approx([0.0, 2.0, 3.0])
    assert np.isfinite(peaks).all() and peaks[1] == pytest.approx([0.0, 0.0, 0.0])


def test_decoding_the_encoding_recovers_every_landmark() -> None:
    # voxels (2.6, 1.45, 1.2), (1.8, 3.0, 1.4), (3.4, 0.55, 1.63): inside, off the voxel centres
    points = np.array([[7.1, -3.7, 4.6], [4.0, -4.1, 5.2], [8.9, -3.3, 5.89]])
    heatmaps = gaussian_heatmaps(points, AFFINE, (6, 6, 4), sigma_mm=2.5)
    assert decode_heatmaps(heatmaps, AFFINE) == pytest.approx(points, abs=1e-4)
