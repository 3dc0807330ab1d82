"""The segmentation loss against a hand-written Dice + cross-entropy, and the factory's error."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from nnmamba.losses import build_loss

CLASSES = 4


def labels_and_noise(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, CLASSES, (2, 1, 6, 7, 5), generator=generator)
    noise = torch.randn(2, CLASSES, 6, 7, 5, generator=generator)
    return labels, noise


def reference_dice_ce(logits: torch.Tensor, labels: torch.Tensor, smooth: float = 1e-5) -> torch.Tensor:
    """Mean cross-entropy plus soft Dice loss averaged over samples and classes (background included)."""
    cross_entropy = F.cross_entropy(logits, labels[:, 0])
    probabilities = torch.softmax(logits, dim=1)
    target = F.one_hot(labels[:, 0], CLASSES).movedim(-1, 1).float()
    spatial = (2, 3, 4)
    overlap = (probabilities * target).sum(spatial)
    sizes = probabilities.sum(spatial) + target.sum(spatial)
    dice_loss = (1 - (2 * overlap + smooth) / (sizes + smooth)).mean()
    return cross_entropy + dice_loss


def test_segmentation_loss_is_dice_plus_cross_entropy_on_logits_and_integer_labels() -> None:
    labels, logits = labels_and_noise(seed=0)
    assert labels.dtype == torch.int64
    loss = build_loss("segmentation")(logits, labels)
    torch.testing.assert_close(loss, reference_dice_ce(logits, labels))


def test_keywords_reach_the_loss() -> None:
    labels, logits = labels_and_noise(seed=1)
    cross_entropy_only = build_loss("segmentation", lambda_dice=0.0)(logits, labels)
    torch.testing.assert_close(cross_entropy_only, F.cross_entropy(logits, labels[:, 0]))


def test_loss_decreases_as_the_prediction_moves_toward_the_target() -> None:
    labels, noise = labels_and_noise(seed=2)
    target_logits = 6.0 * (F.one_hot(labels[:, 0], CLASSES).movedim(-1, 1).float() * 2 - 1)
    loss_fn = build_loss("segmentation")
    steps = (0.0, 0.25, 0.5, 0.75, 1.0)
    losses = [loss_fn((1 - t) * noise + t * target_logits, labels).item() for t in steps]
    assert all(later < earlier for earlier, later in zip(losses, losses[1:])), losses
    assert losses[-1] < 0.01


def test_unknown_task_names_it_and_the_known_ones() -> None:
    with pytest.raises(ValueError, match=r"'segmentaton'.*segmentation"):
        build_loss("segmentaton")


@pytest.mark.parametrize("task", ["segmentation", "landmark"])
def test_loss_and_gradient_are_the_same_for_channels_last_output(task: str) -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 8, 6, 4, dtype=torch.float64)
    if task == "segmentation":
        target, loss_fn = torch.randint(0, 4, (2, 1, 8, 6, 4)), build_loss(task)
    else:
        target, loss_fn = torch.rand(2, 4, 8, 6, 4, dtype=torch.float64), build_loss(task, foreground_weight=10)
    results = []
    for memory_format in (torch.contiguous_format, torch.channels_last_3d):
        leaf = logits.clone(memory_format=memory_format).requires_grad_()
        loss = loss_fn(leaf, target)
        loss.backward()
        results.append((loss.detach(), leaf.grad))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-12, atol=0)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-12, atol=1e-15)


def test_each_segmentation_loss_matches_its_hand_written_terms() -> None:
    labels, logits = labels_and_noise(seed=3)
    cross_entropy = F.cross_entropy(logits, labels[:, 0])
    torch.testing.assert_close(build_loss("segmentation", terms="ce")(logits, labels), cross_entropy)
    torch.testing.assert_close(build_loss("segmentation", terms="dice")(logits, labels),
                               reference_dice_ce(logits, labels) - cross_entropy)
    with pytest.raises(ValueError, match=r"'focal'.*dice_ce, dice, ce"):
        build_loss("segmentation", terms="focal")
