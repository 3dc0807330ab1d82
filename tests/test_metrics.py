"""Segmentation metrics against a brute-force reference written here, independent of MONAI.

Reference definitions (the ones nnmamba.metrics documents):
- surface of a mask: foreground voxels with at least one background 6-neighbour (face neighbour), where
  outside the volume counts as background;
- surface distance: Euclidean distance in mm between voxel centres (index * spacing), from a surface voxel
  to the nearest surface voxel of the other mask, found by comparing ALL pairs;
- HD95 = max of the two directed 95th percentiles (linear interpolation, numpy's default);
- NSD = (#pred-surface voxels within tol of the gt surface + #gt-surface voxels within tol of the pred
  surface) / (#pred-surface + #gt-surface); a distance equal to the tolerance counts as within.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage

from nnmamba.metrics import BRATS_REGIONS, dice, hd95, nsd, segmentation_metrics

ANISOTROPIC = (0.8, 0.8, 6.5)
SPACINGS = [(1.0, 1.0, 1.0), ANISOTROPIC, (2.0, 0.5, 1.3)]
# Distinct grid distances near a tolerance differ by far more than this; it only absorbs float rounding
# so that ties (distance == tolerance) are counted as within, as documented.
TIE_SLACK_MM = 1e-5


def brute_surface(mask: np.ndarray) -> np.ndarray:
    """Foreground voxels with a background face neighbour (outside the volume is background)."""
    padded = np.pad(mask, 1, constant_values=False)
    core = tuple(slice(1, -1) for _ in range(mask.ndim))
    all_neighbours_foreground = np.ones_like(mask)
    for axis in range(mask.ndim):
        for step in (-1, 1):
            all_neighbours_foreground &= np.roll(padded, step, axis=axis)[core]
    return mask & ~all_neighbours_foreground


def brute_directed_distances(
    from_mask: np.ndarray, to_mask: np.ndarray, spacing: tuple[float, ...]
) -> np.ndarray:
    from_points = np.argwhere(brute_surface(from_mask)) * np.asarray(spacing)
    to_points = np.argwhere(brute_surface(to_mask)) * np.asarray(spacing)
    pairwise = np.sqrt(((from_points[:, None, :] - to_points[None, :, :]) ** 2).sum(axis=-1))
    return pairwise.min(axis=1)


def brute_hd95(pred: np.ndarray, gt: np.ndarray, spacing: tuple[float, ...]) -> float:
    return max(
        np.percentile(brute_directed_distances(pred, gt, spacing), 95),
        np.percentile(brute_directed_distances(gt, pred, spacing), 95),
    )


def brute_nsd(pred: np.ndarray, gt: np.ndarray, spacing: tuple[float, ...], tol: float) -> float:
    pred_to_gt = brute_directed_distances(pred, gt, spacing)
    gt_to_pred = brute_directed_distances(gt, pred, spacing)
    within = (pred_to_gt <= tol + TIE_SLACK_MM).sum() + (gt_to_pred <= tol + TIE_SLACK_MM).sum()
    return within / (pred_to_gt.size + gt_to_pred.size)


def random_blobs(seed: int, shape: tuple[int, ...] = (18, 20, 12), fraction: float = 0.2) -> np.ndarray:
    """Irregular blobs (smoothed noise, thresholded); several components, some touching the border."""
    field = ndimage.gaussian_filter(np.random.default_rng(seed).normal(size=shape), sigma=2.0)
    return field > np.quantile(field, 1.0 - fraction)


def test_brute_surface_of_a_cube_is_its_shell() -> None:
    mask = np.zeros((7, 7, 7), dtype=bool)
    mask[1:6, 1:6, 1:6] = True
    assert brute_surface(mask).sum() == 5**3 - 3**3
    full = np.ones((3, 3, 3), dtype=bool)
    assert brute_surface(full).sum() == 26  # only the centre has all six neighbours inside the volume


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_hd95_and_nsd_match_brute_force_on_random_blobs(seed: int, spacing: tuple[float, ...]) -> None:
    gt = random_blobs(seed)
    pred = random_blobs(seed + 100)
    assert gt.any() and pred.any() and not np.array_equal(gt, pred)
    assert hd95(pred, gt, spacing) == pytest.approx(brute_hd95(pred, gt, spacing), rel=1e-5)
    for tol in (0.5, 1.0, spacing[2], 2.0, 5.0):
        assert nsd(pred, gt, spacing, tol) == pytest.approx(brute_nsd(pred, gt, spacing, tol), abs=1e-12)


def test_small_blob_far_from_border_matches_brute_force() -> None:
    """The union is cropped before the distance computation; a tiny blob makes the crop much smaller."""
    gt = np.zeros((30, 30, 20), dtype=bool)
    pred = np.zeros_like(gt)
    gt[10:14, 11:16, 8:10] = True
    pred[11:15, 12:15, 9:12] = True
    assert hd95(pred, gt, ANISOTROPIC) == pytest.approx(brute_hd95(pred, gt, ANISOTROPIC), rel=1e-5)
    assert nsd(pred, gt, ANISOTROPIC, 1.0) == pytest.approx(brute_nsd(pred, gt, ANISOTROPIC, 1.0), abs=1e-12)


@pytest.mark.parametrize("number_type", [float, np.float64])
def test_anisotropic_spacing_is_applied_per_axis(number_type: type) -> None:
    gt = np.zeros((5, 5, 6), dtype=bool)
    gt[2, 2, 1] = True
    along_last_axis = np.zeros_like(gt)
    along_last_axis[2, 2, 3] = True
    along_first_axis = np.zeros_like(gt)
    along_first_axis[4, 2, 1] = True
    assert hd95(along_last_axis, gt, ANISOTROPIC) == pytest.approx(2 * 6.5, rel=1e-6)
    assert hd95(along_first_axis, gt, ANISOTROPIC) == pytest.approx(2 * 0.8, rel=1e-6)
    assert nsd(along_first_axis, gt, ANISOTROPIC, number_type(1.6)) == 1.0  # a tie counts as within
    assert nsd(along_last_axis, gt, ANISOTROPIC, number_type(12.9)) == 0.0


def test_dice_on_hand_countable_masks() -> None:
    pred = np.zeros((6, 6, 6), dtype=bool)
    gt = np.zeros_like(pred)
    pred[0:2, 0:2, 0:2] = True  # 8 voxels
    gt[0:2, 0:2, 0:3] = True  # 12 voxels, 8 of them shared
    assert dice(pred, gt) == pytest.approx(2 * 8 / (8 + 12))
    disjoint = np.zeros_like(pred)
    disjoint[4:6, 4:6, 4:6] = True
    assert dice(disjoint, gt) == 0.0
    assert dice(gt, gt) == 1.0


@pytest.mark.parametrize("pred_empty", [True, False])
@pytest.mark.parametrize("gt_empty", [True, False])
def test_empty_mask_conventions(pred_empty: bool, gt_empty: bool) -> None:
    shape = (20, 16, 9)
    blob = np.zeros(shape, dtype=bool)
    blob[5:8, 4:9, 2:4] = True
    other = np.zeros(shape, dtype=bool)
    other[6:10, 5:8, 3:5] = True
    pred = np.zeros(shape, dtype=bool) if pred_empty else blob
    gt = np.zeros(shape, dtype=bool) if gt_empty else other
    diagonal = math.sqrt((20 * 0.8) ** 2 + (16 * 0.8) ** 2 + (9 * 6.5) ** 2)  # of the full volume
    if pred_empty and gt_empty:
        expected = (1.0, 0.0, 1.0)
    elif pred_empty or gt_empty:
        expected = (0.0, diagonal, 0.0)
    else:
        expected = (
            2 * (blob & other).sum() / (blob.sum() + other.sum()),
            brute_hd95(pred, gt, ANISOTROPIC),
            brute_nsd(pred, gt, ANISOTROPIC, 1.0),
        )
    got = (dice(pred, gt), hd95(pred, gt, ANISOTROPIC), nsd(pred, gt, ANISOTROPIC, 1.0))
    assert got == pytest.approx(expected, rel=1e-5)


def brats_example() -> tuple[np.ndarray, np.ndarray]:
    """gt: a 4x4x4 edema block (2) with a 2x2x2 core, half necrosis (1) and half enhancing (3).
    pred: enhancing labelled as necrosis (no ET at all) and one extra 4x4 slab of edema."""
    gt = np.zeros((8, 8, 8), dtype=np.int64)
    gt[1:5, 1:5, 1:5] = 2
    gt[2:4, 2:4, 2:4] = 1
    gt[2:3, 2:4, 2:4] = 3
    pred = gt.copy()
    pred[pred == 3] = 1
    pred[5, 1:5, 1:5] = 2
    return pred, gt


def test_brats_regions_are_composed_from_labels() -> None:
    pred, gt = brats_example()
    spacing = (1.0, 1.0, 2.0)
    scores = segmentation_metrics(pred, gt, spacing, BRATS_REGIONS, nsd_tolerance_mm=1.0)
    names = ("WT", "TC", "ET", "mean")
    assert set(scores) == ({f"{metric}_{name}" for metric in ("dice", "hd95", "nsd") for name in names}
                           | {f"hd95_fallback_{name}" for name in names[:3]})
    # Only ET, missed by the prediction, has its HD95 from the empty-mask convention.
    assert [scores[f"hd95_fallback_{name}"] for name in names[:3]] == [0.0, 0.0, 1.0]
    # WT: pred 64 + 16 voxels, gt 64, all 64 shared. TC: identical 8 voxels. ET: 0 predicted of 4.
    assert scores["dice_WT"] == pytest.approx(2 * 64 / (80 + 64))
    assert (scores["dice_TC"], scores["hd95_TC"], scores["nsd_TC"]) == (1.0, 0.0, 1.0)
    diagonal = math.sqrt(8**2 + 8**2 + 16**2)
    assert (scores["dice_ET"], scores["nsd_ET"]) == (0.0, 0.0)
    assert scores["hd95_ET"] == pytest.approx(diagonal)
    wt_pred, wt_gt = pred > 0, gt > 0
    assert scores["hd95_WT"] == pytest.approx(brute_hd95(wt_pred, wt_gt, spacing), rel=1e-5)
    assert scores["nsd_WT"] == pytest.approx(brute_nsd(wt_pred, wt_gt, spacing, 1.0))
    for metric in ("dice", "hd95", "nsd"):
        per_region = [scores[f"{metric}_{name}"] for name in ("WT", "TC", "ET")]
        assert scores[f"{metric}_mean"] == pytest.approx(sum(per_region) / 3)


def test_one_region_per_class_and_a_class_absent_from_both() -> None:
    pred, gt = brats_example()
    organs = {"necrosis": (1,), "edema": (2,), "absent": (7,)}
    scores = segmentation_metrics(pred, gt, ANISOTROPIC, organs, nsd_tolerance_mm=2.0)
    assert (scores["dice_absent"], scores["hd95_absent"], scores["nsd_absent"]) == (1.0, 0.0, 1.0)
    assert scores["hd95_fallback_absent"] == 0.0   # absent from both: 0 mm by convention, nothing to flag
    assert scores["dice_necrosis"] == pytest.approx(2 * 4 / (8 + 4))
    assert scores["hd95_edema"] == pytest.approx(brute_hd95(pred == 2, gt == 2, ANISOTROPIC), rel=1e-5)
    assert scores["nsd_edema"] == pytest.approx(brute_nsd(pred == 2, gt == 2, ANISOTROPIC, 2.0))


@pytest.mark.parametrize(
    ("pred_shape", "spacing", "tolerance", "regions", "message"),
    [
        ((8, 8, 7), (1.0, 1.0, 1.0), 1.0, BRATS_REGIONS, "differ in shape"),
        ((8, 8, 8), (1.0, 1.0), 1.0, BRATS_REGIONS, "one entry per axis"),
        ((8, 8, 8), (1.0, 0.0, 1.0), 1.0, BRATS_REGIONS, "positive"),
        ((8, 8, 8), (1.0, -2.0, 1.0), 1.0, BRATS_REGIONS, "positive"),
        ((8, 8, 8), (1.0, 1.0, 1.0), -1.0, BRATS_REGIONS, "tolerance"),
        ((8, 8, 8), (1.0, 1.0, 1.0), 1.0, {}, "no regions"),
    ],
)
def test_bad_input_raises_one_clear_error(pred_shape, spacing, tolerance, regions, message) -> None:
    gt = np.zeros((8, 8, 8), dtype=np.int64)
    with pytest.raises(ValueError, match=message):
        segmentation_metrics(np.zeros(pred_shape, dtype=np.int64), gt, spacing, regions, tolerance)


def test_mask_functions_validate_too() -> None:
    mask = np.ones((4, 4, 4), dtype=bool)
    with pytest.raises(ValueError, match="differ in shape"):
        dice(mask, mask[:3])
    with pytest.raises(ValueError, match="one entry per axis"):
        hd95(mask, mask, (1.0, 1.0))
    with pytest.raises(ValueError, match="tolerance"):
        nsd(mask, mask, (1.0, 1.0, 1.0), float("nan"))
