"""Landmark detection (the fetal cerebellum of the paper's Table 4): heatmap regression, selected and
scored by radial error in mm.

- prepare: every case resampled to `prepare.spacing`, its points kept in world coordinates.
- train: random patches with Gaussian heatmap targets, drawn around each landmark or anywhere.
- evaluate: whole-volume sliding-window heatmaps decoded to world points and compared with the
  raw points file, so no resampling back is needed; predictions are landmarks-layout JSON.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from nnmamba.data.cases import RawDataset
from nnmamba.data.layouts import get_layout
from nnmamba.data.loading.heatmap_sampling import make_heatmap_loader
from nnmamba.data.preprocessing.landmarks import prepare_landmark_dataset
from nnmamba.data.preprocessing.preprocess import DATASET_JSON, load_preprocessed
from nnmamba.data.readers.landmarks import read_landmarks, write_landmarks
from nnmamba.data.splits import split_cases, with_folds
from nnmamba.ensemble import load_models
from nnmamba.inference import predict_landmarks
from nnmamba.losses import build_loss
from nnmamba.metrics import landmark_metrics, radial_errors
from pipelines.params import ReportSpec, StudySpec
from pipelines.tasks import Evaluator, Scored, Task
from pipelines.tasks.scoring import evaluation_device, mean_per_seed


def prepare(study: StudySpec, raw: RawDataset, out_dir: Path) -> dict:
    """The layout's labels are the landmark names, in the network's output-channel order."""
    return prepare_landmark_dataset(raw.cases, out_dir, names=list(raw.labels.values()),
                                    spacing=study.prepare.spacing, crop_margin=study.prepare.crop_margin)


def split(study: StudySpec, index: dict) -> dict[str, list[str]]:
    """Patient-level random split (or k folds); landmark cases carry points, not label maps."""
    spec, patient_of = study.split, get_layout(study.dataset.layout).patient_of
    if spec.method == "kfold":
        held_out = split_cases(index, patient_of, "random", 0, spec.test, spec.seed, require_labels=False)
        return with_folds(held_out, patient_of, spec.folds, spec.seed)
    return split_cases(index, patient_of, spec.method, spec.val, spec.test, spec.seed, require_labels=False)


def train_loader(study: StudySpec, dataset_dir: Path, index: dict, case_ids: list[str], seed: int, rank: int,
                 world_size: int, pin_memory: bool = False) -> Iterable[Mapping[str, torch.Tensor]]:
    """Random patches with Gaussian heatmap targets, drawn around each landmark or anywhere (worker-batched)."""
    train, cases = study.train, [index["cases"][c] for c in case_ids]
    return make_heatmap_loader(
        image_paths=[dataset_dir / c["image"] for c in cases],
        landmarks_mm=[[c["landmarks_mm"][name] for name in index["landmarks"]] for c in cases],
        sigma_mm=train.heatmap.sigma_mm,
        **train.patch_sampling(),
        seed=seed,
        rank=rank,
        world_size=world_size,
        pin_memory=pin_memory,
        passes=None,   # fixed-step epochs: the workers fetch on across the end of each pass
    )


def validate(model: nn.Module, dataset_dir: Path, case_ids: list[str], study: StudySpec,
             device: torch.device, dtype: torch.dtype | None) -> list[dict[str, Any]]:
    """Whole-volume sliding-window heatmaps, decoded to world points: radial errors (mm) per validation case."""
    index = json.loads((Path(dataset_dir) / DATASET_JSON).read_text())
    records = []
    for case_id in case_ids:
        image = load_preprocessed(dataset_dir, case_id)["image"]
        predicted = predict_landmarks(model, image.data, image.affine, study.train.patch_size,
                                      overlap=study.train.val_overlap, device=device, amp_dtype=dtype)
        truth = [index["cases"][case_id]["landmarks_mm"][name] for name in index["landmarks"]]
        records.append({"case_id": case_id, "errors_mm": radial_errors(predicted, truth).tolist()})
    return records


def summarise(records: list[dict[str, Any]]) -> dict[str, float]:
    """Mean radial error over every landmark of every validation case."""
    errors = [error for record in records for error in record["errors_mm"]]
    if not errors:
        raise ValueError("no validation cases to select the landmark model on: set split.val > 0")
    return {"val_mre_mm": float(np.mean(errors))}


def score(model_dirs: list[str], dataset_dir: str, case_ids: list[str], study: StudySpec) -> Scored:
    """Score one trained landmark model (or the fold ensemble of several): (radial errors in mm per landmark, predicted RAS world points) per case.

    The truth is read from the raw points file, not from the prepared copy.
    """
    device = evaluation_device()
    model, _ = load_models(model_dirs, device)
    evaluate = study.evaluate
    index = json.loads((Path(dataset_dir) / DATASET_JSON).read_text())
    names = index["landmarks"]
    scored = []
    for case_id in case_ids:
        image = load_preprocessed(Path(dataset_dir), case_id)["image"]
        predicted = predict_landmarks(model, image.data, image.affine, study.train.patch_size,
                                      overlap=evaluate.overlap, mirror_axes=evaluate.mirror_axes, device=device)
        truth = read_landmarks(Path(index["cases"][case_id]["raw_points"]), names, case_id)
        metrics = landmark_metrics(predicted, [truth[name] for name in names], names)
        points = {name: [float(v) for v in point] for name, point in zip(names, predicted)}
        scored.append(({"case_id": case_id, **{f"test_{k}": v for k, v in metrics.items()}}, points))
    return scored


def save_points(scored: Scored, out_root: Path, trial: str) -> None:
    """Predicted points as landmarks-layout JSON (RAS), `<trial>/<case>.json`, readable by the annotations' reader."""
    (out_root / trial).mkdir(parents=True, exist_ok=True)
    for row, points in scored:
        write_landmarks(out_root / trial / f"{row['case_id']}.json", points)


def report(studies: list[StudySpec], settings: ReportSpec, out_dir: Path) -> list[Path]:
    """Table 4 and the predicted-vs-true slices per study (matplotlib loads in the report stage only)."""
    from pipelines.reports.landmark import landmark_reports

    return landmark_reports(studies, out_dir)


def prediction_record(study: StudySpec, index: dict) -> dict:
    """The spacing and crop margin of `prepare`, the landmark names in output order, the windows' settings,
    the span of the training images' intensities."""
    return {"task": study.task, "channels": index["channels"], "landmarks": index["landmarks"],
            "spacing": index["spacing"], "crop_margin": study.prepare.crop_margin,
            "patch_size": list(study.train.patch_size), "overlap": study.evaluate.overlap,
            "mirror_axes": list(study.evaluate.mirror_axes),
            "intensity_ranges": index["intensity_ranges"]}


TASK = Task(
    name="landmark",
    mlflow_prefix="landmark",
    selection_metric="val_mre_mm",
    selection_mode="min",
    prepare=prepare,
    split=split,
    resolve=lambda study, index: study,
    train_loader=train_loader,
    loss=lambda train, _: build_loss("landmark", foreground_weight=train.heatmap.foreground_weight),
    validate=validate,
    summarise=summarise,
    input_shape=lambda study: study.train.patch_size,
    prediction_record=prediction_record,
    evaluator=Evaluator(score, save_points, mean_per_seed, headline="test_mre_mm_mean"),
    report=report,
)
