"""What differs between the paper's tasks during training: data, loss, validation and model selection.

The training loop (`pipelines/train_worker.py`) is task-agnostic; it looks the task up here. A
task's validation runs on each worker's share of the validation cases and returns per-case
records; `summarise` turns the records of ALL workers into the reported metrics, so metrics that
do not average over shards (AUC, say) are still computed on the whole validation set.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchio as tio
from torch import nn

from nnmamba.data.loading.heatmap_sampling import make_heatmap_loader
from nnmamba.data.preprocessing.preprocess import DATASET_JSON, load_preprocessed
from nnmamba.data.loading.augmentation import augmentation_transform
from nnmamba.data.loading.sampling import (PrivateRngLoader, SubjectGroups, groups_per_pass,
                                   make_patch_loader, rank_shard)
from nnmamba.engine import amp_dtype, validation_dice
from nnmamba.inference import class_probabilities, predict_landmarks
from nnmamba.losses import build_loss
from nnmamba.metrics import classification_metrics, radial_errors


def _patch_shape(config: dict) -> Sequence[int]:
    return config["train"]["patch_size"]


@dataclass(frozen=True)
class TrainingTask:
    """The task-specific pieces of training; `selection_mode` is "max" or "min"; `loss` takes the `train` section.

    `input_shape(config)` is the spatial shape the network is fed (the patch, or the whole
    volume for classification): the example input logged with the MLflow model.
    """

    name: str
    selection_metric: str
    selection_mode: str
    train_loader: Callable[..., Iterable[Mapping[str, torch.Tensor]]]
    loss: Callable[[dict], nn.Module]
    validate: Callable[..., list[dict[str, Any]]]
    summarise: Callable[[list[dict[str, Any]]], dict[str, float]]
    input_shape: Callable[[dict], Sequence[int]] = _patch_shape


def segmentation_loader(dataset_dir: Path, index: dict, case_ids: list[str], train: dict, seed: int,
                        rank: int, world_size: int,
                        pin_memory: bool = False) -> Iterable[Mapping[str, torch.Tensor]]:
    """Foreground-oversampled random patches of the training cases, batched in the loader workers.

    Images come in the autocast dtype when training with one (see ``make_patch_loader``)."""
    cases = [index["cases"][c] for c in case_ids]
    return make_patch_loader(
        image_paths=[dataset_dir / c["image"] for c in cases],
        label_paths=[dataset_dir / c["label"] for c in cases],
        patch_size=tuple(train["patch_size"]),
        batch_size=train["batch_size"],
        samples_per_volume=train["samples_per_volume"],
        queue_length=train["queue_length"],
        label_probabilities={int(k): v for k, v in train["label_probabilities"].items()},
        augmentation=train["augmentation"],
        num_workers=train["data_workers"],
        seed=seed,
        rank=rank,
        world_size=world_size,
        pin_memory=pin_memory,
        image_dtype=amp_dtype(train["amp"]) or torch.float32,
    )


def segmentation_validate(model: nn.Module, dataset_dir: Path, case_ids: list[str], config: dict,
                          device: torch.device, dtype: torch.dtype | None) -> list[dict[str, Any]]:
    """Whole-volume sliding-window Dice, averaged over the study's regions, per validation case."""
    subjects = (load_preprocessed(dataset_dir, case_id) for case_id in case_ids)
    pairs = ((s["image"].data, s["label"].data) for s in subjects)
    train, regions = config["train"], config["evaluate"]["regions"]
    scores = validation_dice(model, pairs, regions, train["patch_size"], train["val_overlap"], device, dtype)
    return [{"case_id": case_id, "dice": score} for case_id, score in zip(case_ids, scores)]


def segmentation_summarise(records: list[dict[str, Any]]) -> dict[str, float]:
    return {"val_dice_mean": sum(r["dice"] for r in records) / max(len(records), 1)}


def landmark_loader(dataset_dir: Path, index: dict, case_ids: list[str], train: dict, seed: int,
                    rank: int, world_size: int, pin_memory: bool = False,
                    ) -> Iterable[Mapping[str, torch.Tensor]]:
    """Random patches with Gaussian heatmap targets, drawn around each landmark or anywhere (worker-batched)."""
    cases = [index["cases"][c] for c in case_ids]
    return make_heatmap_loader(
        image_paths=[dataset_dir / c["image"] for c in cases],
        landmarks_mm=[[c["landmarks_mm"][name] for name in index["landmarks"]] for c in cases],
        sigma_mm=train["heatmap"]["sigma_mm"],
        patch_size=tuple(train["patch_size"]),
        batch_size=train["batch_size"],
        samples_per_volume=train["samples_per_volume"],
        queue_length=train["queue_length"],
        label_probabilities={int(k): v for k, v in train["label_probabilities"].items()},
        augmentation=train["augmentation"],
        num_workers=train["data_workers"],
        seed=seed,
        rank=rank,
        world_size=world_size,
        pin_memory=pin_memory,
    )


def landmark_validate(model: nn.Module, dataset_dir: Path, case_ids: list[str], config: dict,
                      device: torch.device, dtype: torch.dtype | None) -> list[dict[str, Any]]:
    """Whole-volume sliding-window heatmaps, decoded to world points: radial errors (mm) per validation case."""
    index = json.loads((Path(dataset_dir) / DATASET_JSON).read_text())
    train, records = config["train"], []
    for case_id in case_ids:
        image = load_preprocessed(dataset_dir, case_id)["image"]
        predicted = predict_landmarks(model, image.data, image.affine, train["patch_size"],
                                      overlap=train["val_overlap"], device=device, amp_dtype=dtype)
        truth = [index["cases"][case_id]["landmarks_mm"][name] for name in index["landmarks"]]
        records.append({"case_id": case_id, "errors_mm": radial_errors(predicted, truth).tolist()})
    return records


def landmark_summarise(records: list[dict[str, Any]]) -> dict[str, float]:
    """Mean radial error over every landmark of every validation case."""
    errors = [error for record in records for error in record["errors_mm"]]
    if not errors:
        raise ValueError("no validation cases to select the landmark model on: set split.val > 0")
    return {"val_mre_mm": float(np.mean(errors))}


def classification_loader(dataset_dir: Path, index: dict, case_ids: list[str], train: dict, seed: int,
                          rank: int, world_size: int, pin_memory: bool = False) -> Iterable[Mapping[str, Any]]:
    """Shuffled batches of whole augmented volumes with their class index, this rank's cases only.

    Ranks take the cases round robin (``rank_shard``). Each pass deals the rank's cases into full
    batches (``SubjectGroups``: the last one is topped up with cases drawn again), so a CUDA-graph
    step, which needs one batch shape, never meets a short last batch, and every rank has
    ``groups_per_pass`` batches per pass.
    """
    mine = rank_shard(case_ids, rank, world_size)
    subjects = [
        tio.Subject(image=tio.ScalarImage(dataset_dir / index["cases"][c]["image"]),
                    target=index["cases"][c]["class_index"], case_id=c)
        for c in mine
    ]
    dataset = tio.SubjectsDataset(subjects, transform=augmentation_transform(train["augmentation"]))
    batch_size = train["batch_size"]
    batches = SubjectGroups(len(mine), batch_size, groups_per_pass(len(case_ids), batch_size, world_size))
    return PrivateRngLoader(dataset, seed=seed, rank=rank, batch_sampler=batches, num_workers=train["data_workers"],
                            collate_fn=collate_volumes, pin_memory=pin_memory)


def collate_volumes(subjects: list[tio.Subject]) -> dict[str, Any]:
    """``image`` float32 [B, C, D, H, W], ``label`` int64 [B] (class indices), ``case_id`` list of str."""
    return {
        "image": torch.stack([s["image"].data for s in subjects]).to(torch.float32),
        "label": torch.tensor([s["target"] for s in subjects], dtype=torch.int64),
        "case_id": [s["case_id"] for s in subjects],
    }


def classification_validate(model: nn.Module, dataset_dir: Path, case_ids: list[str], config: dict,
                            device: torch.device, dtype: torch.dtype | None) -> list[dict[str, Any]]:
    """Class probabilities of each validation case; the metrics need all of them (AUC), see summarise."""
    cases = _dataset_cases(dataset_dir)
    records = []
    for case_id in case_ids:
        image = load_preprocessed(dataset_dir, case_id)["image"].data
        probabilities = class_probabilities(model, image, device=device, amp_dtype=dtype)[0]
        records.append({"case_id": case_id, "target": cases[case_id]["class_index"],
                        "probabilities": probabilities.tolist()})
    return records


def classification_summarise(records: list[dict[str, Any]]) -> dict[str, float]:
    metrics = classification_metrics([r["target"] for r in records], np.array([r["probabilities"] for r in records]))
    return {f"val_{name}": value for name, value in metrics.items()}


def _dataset_cases(dataset_dir: Path) -> dict[str, dict]:
    return json.loads((Path(dataset_dir) / DATASET_JSON).read_text())["cases"]


def _volume_shape(config: dict) -> Sequence[int]:
    return config["prepare"]["shape"]


TASKS: dict[str, TrainingTask] = {
    "segmentation": TrainingTask(
        name="segmentation",
        selection_metric="val_dice_mean",
        selection_mode="max",
        train_loader=segmentation_loader,
        loss=lambda train: build_loss("segmentation"),
        validate=segmentation_validate,
        summarise=segmentation_summarise,
    ),
    "landmark": TrainingTask(
        name="landmark",
        selection_metric="val_mre_mm",
        selection_mode="min",
        train_loader=landmark_loader,
        loss=lambda train: build_loss("landmark", foreground_weight=train["heatmap"]["foreground_weight"]),
        validate=landmark_validate,
        summarise=landmark_summarise,
    ),
    "classification": TrainingTask(
        name="classification",
        selection_metric="val_auc",
        selection_mode="max",
        train_loader=classification_loader,
        loss=lambda train: build_loss("classification"),
        validate=classification_validate,
        summarise=classification_summarise,
        input_shape=_volume_shape,
    ),
}


def get_task(name: str) -> TrainingTask:
    """The registered training task called `name`; a clear error lists the known ones."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known: {sorted(TASKS)}")
    return TASKS[name]
