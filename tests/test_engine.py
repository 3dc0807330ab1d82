"""The training loop: mean loss and weights against hand-written steps, its stop on a non-finite loss, and the\nlearning-rate schedules against nnU-Net's formula."""

from __future__ import annotations

import copy
import time
from itertools import islice

import pytest
import torch
from torch import nn

from nnmamba.engine import WaitTimedBatches, build_optimizer, build_schedule, train_epoch


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


def test_poly_schedule_follows_nnunet_formula_and_resumes_where_it_stopped() -> None:
    """nnU-Net's PolyLRScheduler: lr_e = lr_0 * (1 - e / epochs) ** 0.9 at the start of epoch e; a
    schedule restored from a checkpoint's state_dict continues the curve instead of restarting it."""
    epochs, lr = 6, 0.01
    optimizer = build_optimizer(_model(), "sgd", lr=lr, weight_decay=3e-5, momentum=0.99, nesterov=True)
    schedule = build_schedule(optimizer, "poly", epochs)
    seen = []
    for epoch in range(3):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    resumed_optimizer = build_optimizer(_model(), "sgd", lr=lr, weight_decay=3e-5, momentum=0.99, nesterov=True)
    resumed_optimizer.load_state_dict(optimizer.state_dict())
    resumed = build_schedule(resumed_optimizer, "poly", epochs)
    resumed.load_state_dict(schedule.state_dict())
    for epoch in range(3, epochs):
        seen.append(resumed_optimizer.param_groups[0]["lr"])
        resumed_optimizer.step()
        resumed.step()
    assert seen == pytest.approx([lr * (1 - e / epochs) ** 0.9 for e in range(epochs)], rel=1e-6)
    assert resumed_optimizer.param_groups[0]["nesterov"] and resumed_optimizer.param_groups[0]["momentum"] == 0.99


def test_constant_schedule_is_none_and_unknown_settings_are_refused() -> None:
    optimizer = build_optimizer(_model(), "adam", lr=0.01, weight_decay=0.0)
    assert build_schedule(optimizer, "constant", 10) is None
    with pytest.raises(ValueError, match="unknown learning-rate schedule 'cosine'"):
        build_schedule(optimizer, "cosine", 10)
    with pytest.raises(ValueError, match="SGD settings"):
        build_optimizer(_model(), "adam", lr=0.01, weight_decay=0.0, momentum=0.9)


@CUDA
@pytest.mark.parametrize("name", ["sgd", "adam"])
def test_a_scheduled_rate_reaches_a_replayed_cuda_graph(name: str) -> None:
    """With `tensor_lr` the poly schedule's new rate is read by the recorded optimizer step, so the
    graphed run trains as an eager one with the same schedule does (a float rate would stay baked in)."""
    from nnmamba.engine import CapturedTrainStep, optimisation_step
    settings = {"momentum": 0.99, "nesterov": True} if name == "sgd" else {}
    batches, loss_fn, device = _batches(6), nn.CrossEntropyLoss(), torch.device("cuda")
    graphed_model, eager_model = _model().to(device), _model().to(device)
    graphed = build_optimizer(graphed_model, name, lr=0.01, weight_decay=0.0, capturable=True, tensor_lr=True,
                              **settings)
    eager = build_optimizer(eager_model, name, lr=0.01, weight_decay=0.0, **settings)
    schedules = [build_schedule(graphed, "poly", 3), build_schedule(eager, "poly", 3)]
    step = CapturedTrainStep(graphed_model, loss_fn, graphed, None, warmup=1)
    for epoch in range(3):
        for batch in batches[2 * epoch:2 * epoch + 2]:
            image, label = batch["image"].to(device), batch["label"].to(device)
            step(image, label)
            optimisation_step(eager_model, loss_fn, eager, image, label, None)
        for schedule in schedules:
            schedule.step()
    for trained, reference in zip(graphed_model.parameters(), eager_model.parameters(), strict=True):
        torch.testing.assert_close(trained, reference, rtol=1e-4, atol=1e-5)


def test_wait_timed_batches_count_the_time_spent_waiting_for_each_batch() -> None:
    def slow(n: int):
        for index in range(n):
            time.sleep(0.02)
            yield index

    created = time.time()
    batches = WaitTimedBatches(slow(5))
    assert batches.first_at is None
    assert list(islice(batches, 3)) == [0, 1, 2]
    first_at = batches.first_at
    assert created + 0.02 <= first_at < created + 0.06   # when the first batch arrived, not the third
    first = batches.take_waited_s()
    assert 0.06 <= first < 1.0
    assert batches.take_waited_s() == 0.0   # taken once
    assert list(batches) == [3, 4]
    assert batches.take_waited_s() >= 0.04
    assert batches.first_at == first_at
