"""ACC, F1 and AUC against values worked out by hand, and the cross-entropy loss entry."""

import numpy as np
import pytest
import torch

from nnmamba.losses import build_loss
from nnmamba.metrics import classification_metrics


def binary(p_positive):
    p = np.asarray(p_positive, dtype=float)
    return np.stack([1 - p, p], axis=1)


def test_binary_metrics_by_hand():
    # Predicted (argmax): 0, 1, 0, 1, 1 -> 3 of 5 right. Positive class 1: TP 2, FP 1, FN 1 -> F1 = 2/3.
    # AUC: of the 3 x 2 (positive, negative) pairs, the positive scores higher in 5 -> 5/6.
    metrics = classification_metrics([0, 0, 1, 1, 1], binary([0.1, 0.6, 0.4, 0.8, 0.9]))
    assert metrics == pytest.approx({"acc": 3 / 5, "f1": 2 / 3, "auc": 5 / 6})


def test_tied_scores_count_half_in_auc():
    # Pairs: (0.5 vs 0.5) tie = 1/2, (0.5 vs 0.2) = 1, (0.9 vs 0.5) = 1, (0.9 vs 0.2) = 1 -> 3.5 / 4.
    metrics = classification_metrics([0, 0, 1, 1], binary([0.5, 0.2, 0.5, 0.9]))
    assert metrics["auc"] == pytest.approx(3.5 / 4)


def test_three_classes_use_macro_f1_and_one_vs_rest_auc():
    targets = [0, 1, 2, 2]
    probabilities = np.array([[0.7, 0.2, 0.1], [0.2, 0.5, 0.3], [0.1, 0.6, 0.3], [0.1, 0.2, 0.7]])
    # Predicted 0, 1, 1, 2: class F1s 1, 2/3 (TP 1, FP 1), 2/3 (TP 1, FN 1) -> macro 7/9.
    # One-vs-rest AUCs: class 0 ranks perfectly (1); class 1: positive 0.5 beats 0.2, 0.2 and loses to
    # 0.6 (2/3); class 2: positives 0.3, 0.7 vs negatives 0.1, 0.3: 1 + 1/2 (tie) + 1 + 1 = 7/8.
    # Macro: (1 + 2/3 + 7/8) / 3 = 61/72.
    metrics = classification_metrics(targets, probabilities)
    assert metrics == pytest.approx({"acc": 3 / 4, "f1": 7 / 9, "auc": 61 / 72})


def test_auc_needs_every_class():
    with pytest.raises(ValueError, match="every class"):
        classification_metrics([1, 1], binary([0.2, 0.9]))


def test_classification_loss_is_cross_entropy_on_class_indices():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    loss = build_loss("classification")(logits, torch.tensor([0, 0]))
    expected = (-torch.log_softmax(logits, 1)[[0, 1], [0, 0]]).mean()
    torch.testing.assert_close(loss, expected)
