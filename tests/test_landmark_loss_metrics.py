"""Landmark loss and metrics against hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from nnmamba.losses import WeightedHeatmapMSE, build_loss
from nnmamba.metrics import landmark_metrics, radial_errors


def test_weighted_heatmap_mse_by_hand() -> None:
    # weights 1 + 9 * target = [10, 5.5, 1]; squared errors [1, 0.25, 0.0625] -> (10 + 1.375 + 0.0625) / 3
    target = torch.tensor([1.0, 0.5, 0.0]).reshape(1, 1, 1, 1, 3)
    prediction = torch.tensor([0.0, 0.0, 0.25]).reshape(1, 1, 1, 1, 3)
    loss = build_loss("landmark", foreground_weight=10)(prediction, target)
    assert float(loss) == pytest.approx((10 + 1.375 + 0.0625) / 3)


def test_weight_one_is_plain_mse_and_bad_input_is_refused() -> None:
    prediction, target = torch.randn(2, 3, 4, 4, 4), torch.rand(2, 3, 4, 4, 4)
    assert float(WeightedHeatmapMSE(1.0)(prediction, target)) == pytest.approx(float(F.mse_loss(prediction, target)))
    with pytest.raises(ValueError, match="foreground_weight"):
        WeightedHeatmapMSE(0.5)
    with pytest.raises(ValueError, match="differ in shape"):
        WeightedHeatmapMSE(2.0)(prediction, target[:, :2])


def test_radial_errors_and_mre_by_hand() -> None:
    truth = np.array([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    predicted = np.array([[3.0, 4.0, 0.0], [2.0, 3.0, 3.0]])  # 5 mm (3-4-5), 3 mm (1-2-2)
    assert radial_errors(predicted, truth) == pytest.approx([5.0, 3.0])
    assert landmark_metrics(predicted, truth, ["P", "Q"]) == {"mre_mm_P": 5.0, "mre_mm_Q": 3.0, "mre_mm_mean": 4.0}
    with pytest.raises(ValueError, match="landmark names"):
        landmark_metrics(predicted, truth, ["P"])
    with pytest.raises(ValueError, match=r"\[\.\.\., K, 3\]"):
        radial_errors(predicted[:, :2], truth[:, :2])
