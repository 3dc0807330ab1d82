"""The training loop: mean loss and weights against hand-written steps, and its stop on a non-finite loss."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from nnmamba.engine import build_optimizer, train_epoch


def _batches(count: int, nan_at: int | None = None) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    batches = [{"image": torch.randn(2, 1, 4, 4, 4, generator=generator),
                "label": torch.randint(0, 3, (2, 4, 4, 4), generator=generator)} for _ in range(count)]
    if nan_at is not None:
        batches[nan_at]["image"][0, 0, 0, 0, 0] = float("nan")
    return batches


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv3d(4, 3, 1))


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.parametrize("device, pinned", [("cpu", False), pytest.param("cuda", False, marks=CUDA),
                                            pytest.param("cuda", True, marks=CUDA)])
def test_mean_loss_and_weights_match_plain_steps(device: str, pinned: bool) -> None:
    """On a GPU the batches go through the side-stream copies of `device_batches`, pinned or not.

    The loop gets the labels as uint8, as the patch loader delivers them; the loss needs them int64.
    """
    batches, loss_fn = _batches(4), nn.CrossEntropyLoss()
    compact = [{**batch, "label": batch["label"].to(torch.uint8)} for batch in batches]
    if pinned:
        compact = [{key: value.pin_memory() for key, value in batch.items()} for batch in compact]
    model = _model().to(device)
    reference = copy.deepcopy(model)
    optimizer = build_optimizer(model, "adam", lr=0.01, weight_decay=0.001)
    reference_optimizer = build_optimizer(reference, "adam", lr=0.01, weight_decay=0.001)
    expected = []
    for batch in batches:
        reference_optimizer.zero_grad()
        loss = loss_fn(reference(batch["image"].to(device)), batch["label"].to(device))
        loss.backward()
        reference_optimizer.step()
        expected.append(loss.item())

    mean = train_epoch(model, iter(compact), loss_fn, optimizer, 4, torch.device(device), channels_last=True)

    assert mean == pytest.approx(sum(expected) / 4, rel=1e-5)
    for trained, manual in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(trained, manual)


def test_a_non_finite_loss_stops_training_naming_its_step() -> None:
    model = _model()
    optimizer = build_optimizer(model, "adam", lr=0.01, weight_decay=0.001)
    with pytest.raises(FloatingPointError, match="at step 2"):
        train_epoch(model, iter(_batches(5, nan_at=2)), nn.CrossEntropyLoss(), optimizer, 5, torch.device("cpu"))


def test_a_non_finite_loss_in_the_last_step_is_caught_too() -> None:
    model = _model()
    optimizer = build_optimizer(model, "adam", lr=0.01, weight_decay=0.001)
    with pytest.raises(FloatingPointError, match="at step 2"):
        train_epoch(model, iter(_batches(3, nan_at=2)), nn.CrossEntropyLoss(), optimizer, 3, torch.device("cpu"))
