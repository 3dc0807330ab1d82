"""Evaluation metrics: segmentation overlap and surface metrics, landmark radial errors, image-level
classification metrics.

Segmentation metrics compare boolean masks (non-zero = foreground) of one case, in physical units:
distances are in mm, computed from the voxel spacing, so anisotropic volumes (e.g. 0.8 x 0.8 x 6.5 mm)
are measured correctly.

Surfaces
    The surface of a mask is the set of foreground voxels that disappear under a binary erosion with the
    6-connected (face-neighbour) structuring element, treating outside the volume as background; i.e.
    ``mask & ~binary_erosion(mask)`` as in MONAI's ``get_mask_edges``. Distances are Euclidean, between
    voxel centres, from each surface voxel of one mask to the nearest surface voxel of the other.

Empty-mask conventions (BraTS style; MONAI would return nan or inf, which breaks averages)
    ========  ===========  ===============================================================
    metric    both empty   exactly one empty
    ========  ===========  ===============================================================
    Dice      1.0          0.0
    HD95      0.0 mm       diagonal of the FULL volume in mm, sqrt(sum((shape_i * spacing_i)^2))
    NSD       1.0          0.0
    ========  ===========  ===============================================================

HD95 is symmetric: the larger of the two directed 95th percentiles (linear interpolation) of surface
distances, as MONAI's ``compute_hausdorff_distance(percentile=95)``. NSD (normalised surface distance,
surface Dice) is the fraction of both surfaces lying within ``tolerance_mm`` of the other surface, counted
per surface voxel, as MONAI's ``compute_surface_dice`` without sub-voxel areas.

Speed: the surface distances come from MONAI's ``get_edge_surface_distance`` (KD-tree on CPU) once per
region, and HD95 and NSD are both reduced from them; MONAI's ``compute_hausdorff_distance`` and
``compute_surface_dice`` would each recompute edges and KD-trees. Before that, both masks are cropped to
the bounding box of their union, so a 240x240x155 BraTS case costs what its tumour costs (MONAI crops too,
but only after converting the full volume). No margin is needed: every voxel outside that box is
background in both masks, which is what the erosion assumes outside the cropped array.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Collection, Mapping, Sequence

import numpy as np
import torch
from monai.metrics.utils import get_edge_surface_distance
from monai.transforms.utils import generate_spatial_bounding_box
from sklearn.metrics import accuracy_score, f1_score, roc_auc_score

BRATS_REGIONS: dict[str, tuple[int, ...]] = {"WT": (1, 2, 3), "TC": (1, 3), "ET": (3,)}


def per_class_regions(labels: Mapping[int | str, str]) -> dict[str, tuple[int, ...]]:
    """One region per foreground class of a dataset.json label table: ``{"right_kidney": (2,), ...}``.

    Names become metric-key safe (letters, digits, underscores: "prostate/uterus" ->
    "prostate_uterus"); a name left empty or repeated gets its label value appended.
    Background (0) is not a region.
    """
    regions: dict[str, tuple[int, ...]] = {}
    for value, name in sorted(((int(v), n) for v, n in labels.items())):
        if value == 0:
            continue
        key = re.sub(r"[^0-9A-Za-z]+", "_", str(name)).strip("_") or "label"
        regions[f"{key}_{value}" if key in regions or key == "label" else key] = (value,)
    return regions


def dice(pred: np.ndarray, gt: np.ndarray) -> float:
    """Dice overlap 2|P & G| / (|P| + |G|) of two masks; 1.0 when both are empty.

    Hand-written: MONAI's DiceMetric wants one-hot batch tensors and returns nan for an empty reference,
    while this is one line of numpy with the BraTS convention built in.
    """
    pred_mask, gt_mask = _as_mask_pair(pred, gt)
    total = int(pred_mask.sum()) + int(gt_mask.sum())
    if total == 0:
        return 1.0
    return 2.0 * int(np.logical_and(pred_mask, gt_mask).sum()) / total


def hd95(pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float]) -> float:
    """Symmetric 95th-percentile Hausdorff distance in mm (see the module docstring for empty masks)."""
    pred_mask, gt_mask = _as_mask_pair(pred, gt)
    spacing_mm = _checked_spacing(spacing, pred_mask.ndim)
    empty_result = _empty_case(pred_mask, gt_mask, both=0.0, one=_diagonal_mm(pred_mask.shape, spacing_mm))
    if empty_result is not None:
        return empty_result
    return _hd95_from_distances(*_surface_distances(pred_mask, gt_mask, spacing_mm))


def nsd(pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float], tolerance_mm: float) -> float:
    """Normalised surface distance (surface Dice) at ``tolerance_mm``; 1.0 both empty, 0.0 one empty."""
    pred_mask, gt_mask = _as_mask_pair(pred, gt)
    spacing_mm = _checked_spacing(spacing, pred_mask.ndim)
    _check_tolerance(tolerance_mm)
    empty_result = _empty_case(pred_mask, gt_mask, both=1.0, one=0.0)
    if empty_result is not None:
        return empty_result
    return _nsd_from_distances(*_surface_distances(pred_mask, gt_mask, spacing_mm), tolerance_mm)


def segmentation_metrics(
    pred_label: np.ndarray,
    gt_label: np.ndarray,
    spacing: Sequence[float],
    regions: Mapping[str, Collection[int]],
    nsd_tolerance_mm: float,
) -> dict[str, float]:
    """Dice, HD95 and NSD of each region of two label maps, plus their means over regions.

    A region is a set of labels merged into one mask (BraTS WT = {1, 2, 3}); for organ datasets each class
    is its own region ``{name: (k,)}``. Returns keys ``dice_<region>``, ``hd95_<region>``, ``nsd_<region>``,
    ``hd95_fallback_<region>`` (1.0 where HD95 is the empty-mask diagonal, else 0.0) and ``dice_mean``,
    ``hd95_mean``, ``nsd_mean``.
    """
    pred_label, gt_label = np.asarray(pred_label), np.asarray(gt_label)
    if pred_label.shape != gt_label.shape:
        raise ValueError(
            f"prediction and reference label maps differ in shape: {pred_label.shape} vs {gt_label.shape}"
        )
    if pred_label.ndim != 3:
        raise ValueError(f"label maps must be 3D volumes, got shape {pred_label.shape}")
    spacing_mm = _checked_spacing(spacing, pred_label.ndim)
    _check_tolerance(nsd_tolerance_mm)
    if not regions:
        raise ValueError("no regions given: pass at least one {name: labels} entry")
    results: dict[str, float] = {}
    for name, labels in regions.items():
        pred_mask = np.isin(pred_label, list(labels))
        gt_mask = np.isin(gt_label, list(labels))
        region_scores = _region_metrics(pred_mask, gt_mask, spacing_mm, nsd_tolerance_mm)
        results.update({f"{metric}_{name}": value for metric, value in region_scores.items()})
    for metric in ("dice", "hd95", "nsd"):
        results[f"{metric}_mean"] = float(np.mean([results[f"{metric}_{name}"] for name in regions]))
    return results


def _region_metrics(
    pred_mask: np.ndarray, gt_mask: np.ndarray, spacing_mm: tuple[float, ...], tolerance_mm: float
) -> dict[str, float]:
    """Dice, HD95 and NSD of one region, computing the surface distances once for both surface metrics;
    `hd95_fallback` is 1.0 where the region is in exactly one of the masks, so HD95 is the diagonal
    convention rather than a measured distance (reports footnote such cells)."""
    scores = {"dice": dice(pred_mask, gt_mask), "hd95_fallback": float(pred_mask.any() != gt_mask.any())}
    if pred_mask.any() and gt_mask.any():
        pred_to_gt, gt_to_pred = _surface_distances(pred_mask, gt_mask, spacing_mm)
        scores["hd95"] = _hd95_from_distances(pred_to_gt, gt_to_pred)
        scores["nsd"] = _nsd_from_distances(pred_to_gt, gt_to_pred, tolerance_mm)
    else:  # the public functions apply the empty-mask conventions
        scores["hd95"] = hd95(pred_mask, gt_mask, spacing_mm)
        scores["nsd"] = nsd(pred_mask, gt_mask, spacing_mm, tolerance_mm)
    return scores


def _surface_distances(
    pred_mask: np.ndarray, gt_mask: np.ndarray, spacing_mm: tuple[float, ...]
) -> tuple[np.ndarray, np.ndarray]:
    """Distances in mm from each pred surface voxel to the gt surface, and back; both masks non-empty."""
    start, end = generate_spatial_bounding_box((pred_mask | gt_mask)[None])
    box = tuple(slice(lo, hi) for lo, hi in zip(start, end))
    pred_t, gt_t = (torch.from_numpy(np.ascontiguousarray(m[box])) for m in (pred_mask, gt_mask))
    with warnings.catch_warnings():
        # MONAI 1.5+ passes its own deprecated `always_return_as_numpy` to get_mask_edges internally
        # and warns about it on every call; nothing for a caller to change.
        warnings.filterwarnings("ignore", message=".*always_return_as_numpy", category=FutureWarning)
        _, distances, _ = get_edge_surface_distance(pred_t, gt_t, spacing=spacing_mm, symmetric=True)
    pred_to_gt, gt_to_pred = distances
    return pred_to_gt.numpy(), gt_to_pred.numpy()


def _hd95_from_distances(pred_to_gt: np.ndarray, gt_to_pred: np.ndarray) -> float:
    return float(max(np.percentile(pred_to_gt, 95), np.percentile(gt_to_pred, 95)))


def _nsd_from_distances(pred_to_gt: np.ndarray, gt_to_pred: np.ndarray, tolerance_mm: float) -> float:
    # MONAI's distances are float32: compare against the float32 tolerance, so a distance equal to the
    # tolerance (1 voxel at 0.8 mm, say) still counts as within it; rounding to float32 is monotone.
    tolerance = np.float32(tolerance_mm)
    within = int((pred_to_gt <= tolerance).sum()) + int((gt_to_pred <= tolerance).sum())
    return within / (pred_to_gt.size + gt_to_pred.size)


def _as_mask_pair(pred: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pred_mask, gt_mask = np.asarray(pred).astype(bool, copy=False), np.asarray(gt).astype(bool, copy=False)
    if pred_mask.shape != gt_mask.shape:
        raise ValueError(
            f"prediction and reference masks differ in shape: {pred_mask.shape} vs {gt_mask.shape}"
        )
    return pred_mask, gt_mask


def _checked_spacing(spacing: Sequence[float], ndim: int) -> tuple[float, ...]:
    spacing_mm = tuple(float(s) for s in spacing)
    if len(spacing_mm) != ndim:
        raise ValueError(f"spacing {spacing_mm} must have one entry per axis of the {ndim}D masks")
    if not all(math.isfinite(s) and s > 0 for s in spacing_mm):
        raise ValueError(f"spacing {spacing_mm} must be finite and positive (mm)")
    return spacing_mm


def _empty_case(pred_mask: np.ndarray, gt_mask: np.ndarray, both: float, one: float) -> float | None:
    """The convention's value when a mask is empty, None when both have foreground."""
    pred_any, gt_any = bool(pred_mask.any()), bool(gt_mask.any())
    if pred_any and gt_any:
        return None
    return one if (pred_any or gt_any) else both


def _check_tolerance(tolerance_mm: float) -> None:
    if not (math.isfinite(tolerance_mm) and tolerance_mm >= 0):
        raise ValueError(f"NSD tolerance must be a finite number >= 0 mm, got {tolerance_mm}")


def _diagonal_mm(shape: Sequence[int], spacing_mm: Sequence[float]) -> float:
    return math.sqrt(sum((n * s) ** 2 for n, s in zip(shape, spacing_mm)))


def radial_errors(predicted: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Euclidean distance per landmark between predicted and true points, [..., K, 3] -> [..., K].

    Points are world coordinates in mm, so the errors are in mm whatever the voxel grid.
    """
    predicted, truth = np.asarray(predicted, dtype=np.float64), np.asarray(truth, dtype=np.float64)
    if predicted.shape != truth.shape or predicted.shape[-1] != 3:
        raise ValueError(f"predicted {predicted.shape} and true {truth.shape} points must both be [..., K, 3]")
    return np.linalg.norm(predicted - truth, axis=-1)


def landmark_metrics(predicted: np.ndarray, truth: np.ndarray, names: Sequence[str]) -> dict[str, float]:
    """Radial error (mm) of each named landmark of one case, ``mre_mm_<name>``, and their mean ``mre_mm_mean``.

    Averaged over cases, ``mre_mm_<name>`` is that landmark's mean radial error (MRE), as in the paper's Table 4.
    """
    errors = radial_errors(predicted, truth)
    if errors.shape != (len(names),):
        raise ValueError(f"{errors.shape[0] if errors.ndim else 0} points for {len(names)} landmark names")
    return {**{f"mre_mm_{name}": float(e) for name, e in zip(names, errors)}, "mre_mm_mean": float(errors.mean())}


def classification_metrics(targets: Sequence[int], probabilities: np.ndarray) -> dict[str, float]:
    """ACC, F1 and AUC of a set of cases, as the paper's Table 3 reports them (fractions, not %).

    ``targets`` are class indices, ``probabilities`` [N, K] the predicted class probabilities;
    the predicted class is the most probable one. With two classes, class 1 is the positive
    class of F1 and AUC (AD in NC vs AD, pMCI in sMCI vs pMCI); with more, F1 is the macro
    average and AUC the one-vs-rest macro average. AUC needs every class among the targets.
    """
    targets = np.asarray(targets, dtype=np.int64)
    probabilities = np.asarray(probabilities, dtype=np.float64)
    if probabilities.ndim != 2 or len(probabilities) != len(targets):
        raise ValueError(f"probabilities must be [N, K] for N = {len(targets)} targets, got {probabilities.shape}")
    n_classes = probabilities.shape[1]
    present = set(targets.tolist())
    if present != set(range(n_classes)):
        raise ValueError(f"AUC needs cases of every class 0..{n_classes - 1}; the targets hold {sorted(present)}")
    predicted = probabilities.argmax(axis=1)
    binary = n_classes == 2
    return {
        "acc": float(accuracy_score(targets, predicted)),
        "f1": float(f1_score(targets, predicted, average="binary" if binary else "macro")),
        "auc": float(roc_auc_score(targets, probabilities[:, 1]) if binary
                     else roc_auc_score(targets, probabilities, multi_class="ovr")),
    }
