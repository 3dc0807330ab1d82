"""Classification (ADNI NC vs AD, sMCI vs pMCI of the paper's Table 3): whole volumes, AUC selection,
ACC / F1 / AUC over the whole test set of each seed.

- prepare: whole volumes resampled to one spacing and shape; `dataset.classes` orders the class indices.
- split: stratified by class, whole subjects (every split keeps the dataset's class balance, so
  AUC is defined on val and test); `split.method: folders` takes the dataset's own split.
- evaluate: each model's class probabilities per test case (`predictions/<study>/<trial>.csv`);
  AUC is not a mean of per-case scores, so the metrics are computed per seed over all its cases.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from nnmamba.data.cases import RawDataset
from nnmamba.data.layouts import get_layout
from nnmamba.data.loading.volume_batches import make_volume_loader
from nnmamba.data.preprocessing.preprocess import DATASET_JSON, load_preprocessed
from nnmamba.data.preprocessing.whole_volume import prepare_classification_dataset
from nnmamba.data.splits import classification_split, split_cases, with_folds
from nnmamba.ensemble import load_models
from nnmamba.inference import class_probabilities
from nnmamba.losses import build_loss
from nnmamba.metrics import classification_metrics
from pipelines.params import ReportSpec, StudySpec
from pipelines.tasks import Evaluator, Scored, Task
from pipelines.tasks.scoring import evaluation_device, trial_keys


def prepare(study: StudySpec, raw: RawDataset, out_dir: Path) -> dict:
    return prepare_classification_dataset(raw.cases, out_dir, study.dataset.classes, study.prepare.spacing,
                                          study.prepare.shape)


def split(study: StudySpec, index: dict) -> dict[str, list[str]]:
    """Stratified by class, whole subjects (k folds of them with `kfold`), or the dataset's own folders."""
    spec, cases = study.split, index["cases"]
    if spec.method == "kfold":
        held_out = classification_split(index, 0, spec.test, spec.seed)
        return with_folds(held_out, lambda c: cases[c]["subject"], spec.folds, spec.seed,
                          {c: entry["class_name"] for c, entry in cases.items()})
    if spec.method == "random":
        return classification_split(index, spec.val, spec.test, spec.seed)
    return split_cases(index, get_layout(study.dataset.layout).patient_of, spec.method, spec.val, spec.test,
                       spec.seed, require_labels=False)


def train_loader(study: StudySpec, dataset_dir: Path, index: dict, case_ids: list[str], seed: int, rank: int,
                 world_size: int, pin_memory: bool = False):
    """Shuffled full batches of whole augmented volumes with their class index, this rank's share."""
    train, cases = study.train, index["cases"]
    return make_volume_loader(
        image_paths=[dataset_dir / cases[c]["image"] for c in case_ids],
        targets=[cases[c]["class_index"] for c in case_ids],
        case_ids=case_ids,
        batch_size=train.batch_size,
        augmentation=train.augmentation,
        num_workers=train.data_workers,
        seed=seed,
        rank=rank,
        world_size=world_size,
        pin_memory=pin_memory,
    )


def validate(model: nn.Module, dataset_dir: Path, case_ids: list[str], study: StudySpec,
             device: torch.device, dtype: torch.dtype | None) -> list[dict[str, Any]]:
    """Class probabilities of each validation case; the metrics need all of them (AUC), see summarise."""
    cases = json.loads((Path(dataset_dir) / DATASET_JSON).read_text())["cases"]
    records = []
    for case_id in case_ids:
        image = load_preprocessed(dataset_dir, case_id)["image"].data
        probabilities = class_probabilities(model, image, device=device, amp_dtype=dtype)[0]
        records.append({"case_id": case_id, "target": cases[case_id]["class_index"],
                        "probabilities": probabilities.tolist()})
    return records


def summarise(records: list[dict[str, Any]]) -> dict[str, float]:
    metrics = classification_metrics([r["target"] for r in records], np.array([r["probabilities"] for r in records]))
    return {f"val_{name}": value for name, value in metrics.items()}


def score(model_dirs: list[str], dataset_dir: str, case_ids: list[str], study: StudySpec) -> Scored:
    """One trained classifier's (or fold ensemble's) class probabilities (`p_<class>`) and predicted class index per case.

    Nothing is scored per case: ACC, F1 and AUC are properties of the whole test set (see
    `per_seed`), so the row carries what they are computed from.
    """
    device = evaluation_device()
    model, _ = load_models(model_dirs, device)
    index = json.loads((Path(dataset_dir) / DATASET_JSON).read_text())
    names = [index["labels"][str(i)] for i in range(len(index["labels"]))]
    scored = []
    for case_id in case_ids:
        entry = index["cases"][case_id]
        image = load_preprocessed(Path(dataset_dir), case_id)["image"].data
        probabilities = class_probabilities(model, image, mirror_axes=study.evaluate.mirror_axes,
                                            device=device)[0].numpy()
        scored.append(({"case_id": case_id, "subject": entry["subject"], "target": entry["class_index"],
                        **{f"p_{name}": float(p) for name, p in zip(names, probabilities)},
                        "predicted": int(probabilities.argmax())}, None))
    return scored


def save_probabilities(scored: Scored, out_root: Path, trial: str) -> None:
    """One model's class probabilities of every test case as `<trial>.csv`."""
    out_root.mkdir(parents=True, exist_ok=True)
    pd.DataFrame([row for row, _ in scored]).to_csv(out_root / f"{trial}.csv", index=False)


def probability_columns(per_case: pd.DataFrame) -> list[str]:
    """The `p_<class>` columns of a classification per-case table, in class order."""
    return [c for c in per_case.columns if c.startswith("p_")]


def per_seed(per_case: pd.DataFrame) -> pd.DataFrame:
    """ACC, F1 and AUC of each trial over all its test cases, as `test_acc`, `test_f1`, `test_auc`."""
    columns, keys = probability_columns(per_case), trial_keys(per_case)
    rows = {
        key: {f"test_{name}": value for name, value in
              classification_metrics(frame["target"].to_numpy(), frame[columns].to_numpy()).items()}
        for key, frame in per_case.groupby(keys)
    }
    return pd.DataFrame.from_dict(rows, orient="index").rename_axis(keys)


def report(studies: list[StudySpec], settings: ReportSpec, out_dir: Path) -> list[Path]:
    """Table 3 per dataset and a ROC curve per study (matplotlib loads in the report stage only)."""
    from pipelines.reports.classification import classification_reports

    return classification_reports(studies, out_dir)


def prediction_record(study: StudySpec, index: dict) -> dict:
    """The spacing and shape of `prepare`, the class names in output order; the span of the training images' intensities."""
    return {"task": study.task, "channels": index["channels"],
            "classes": [index["labels"][str(i)] for i in range(len(index["labels"]))],
            "spacing": list(study.prepare.spacing), "shape": list(study.prepare.shape),
            "mirror_axes": list(study.evaluate.mirror_axes),
            "intensity_ranges": index["intensity_ranges"]}


TASK = Task(
    name="classification",
    mlflow_prefix="cls",
    selection_metric="val_auc",
    selection_mode="max",
    prepare=prepare,
    split=split,
    resolve=lambda study, index: study,
    train_loader=train_loader,
    loss=lambda train, _: build_loss("classification"),
    validate=validate,
    summarise=summarise,
    input_shape=lambda study: study.prepare.shape,
    prediction_record=prediction_record,
    evaluator=Evaluator(score, save_probabilities, per_seed, headline="test_auc"),
    report=report,
)
