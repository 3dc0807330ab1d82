"""Per-class organ metrics (AMOS, nnU-Net datasets) against the brute-force reference of test_metrics.

Empty-mask conventions per class (nnmamba.metrics): a class absent from both prediction and truth
scores Dice 1, HD95 0 mm, NSD 1; a class in only one of them scores Dice 0, NSD 0 and HD95 = the
diagonal of the whole volume in mm. Means are over all classes of the dataset.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from nnmamba.metrics import per_class_regions, segmentation_metrics
from tests.test_metrics import brute_hd95, brute_nsd, random_blobs

SPACING = (0.8, 0.8, 6.5)
TOLERANCE = 2.0


def test_regions_from_dataset_json_labels() -> None:
    labels = {"0": "background", "1": "spleen", "2": "right kidney", "15": "prostate/uterus", "3": "", "4": "liver",
              "5": "liver"}
    assert per_class_regions(labels) == {"spleen": (1,), "right_kidney": (2,), "label_3": (3,), "liver": (4,),
                                         "liver_5": (5,), "prostate_uterus": (15,)}


def _brute(pred: np.ndarray, gt: np.ndarray) -> dict[str, float]:
    if not pred.any() and not gt.any():
        return {"dice": 1.0, "hd95": 0.0, "nsd": 1.0}
    if not pred.any() or not gt.any():
        diagonal = math.sqrt(sum((n * s) ** 2 for n, s in zip(pred.shape, SPACING)))
        return {"dice": 0.0, "hd95": diagonal, "nsd": 0.0}
    return {"dice": 2 * (pred & gt).sum() / (pred.sum() + gt.sum()), "hd95": brute_hd95(pred, gt, SPACING),
            "nsd": brute_nsd(pred, gt, SPACING, TOLERANCE)}


def test_every_class_and_the_means_match_brute_force() -> None:
    shape = (18, 20, 12)
    gt = np.zeros(shape, dtype=np.int16)
    pred = np.zeros(shape, dtype=np.int16)
    gt[random_blobs(1, shape, 0.25)] = 1
    pred[random_blobs(2, shape, 0.25)] = 1
    gt[random_blobs(3, shape, 0.08)] = 2
    pred[random_blobs(3, shape, 0.08) & random_blobs(4, shape, 0.5)] = 2
    gt[4:7, 5:8, 3:5] = 3  # class 3: missed entirely
    pred[12:14, 2:4, 8:10] = 4  # class 4: a false positive only
    labels = {0: "background", 1: "liver", 2: "right kidney", 3: "gall bladder", 4: "aorta", 5: "bladder"}
    regions = per_class_regions(labels)
    scores = segmentation_metrics(pred, gt, SPACING, regions, TOLERANCE)
    expected = {name: _brute(pred == value, gt == value) for name, (value,) in regions.items()}
    for name, reference in expected.items():
        for metric, value in reference.items():
            assert scores[f"{metric}_{name}"] == pytest.approx(value, rel=1e-5), (metric, name)
    assert expected["bladder"] == {"dice": 1.0, "hd95": 0.0, "nsd": 1.0}  # absent from both
    assert expected["gall_bladder"]["dice"] == 0.0 and expected["aorta"]["dice"] == 0.0
    for metric in ("dice", "hd95", "nsd"):
        assert scores[f"{metric}_mean"] == pytest.approx(np.mean([e[metric] for e in expected.values()]), rel=1e-5)
