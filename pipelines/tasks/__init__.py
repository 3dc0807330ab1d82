"""The pipeline's tasks: what differs between segmentation, landmark detection and classification.

Each task is one module of this package holding one `Task`; the stages are task-agnostic and look
the study's task up here. A new task is a new module plus one line in `TASK_MODULES`. Modules are
imported on first use, so a stage loads only the task it runs.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:  # the specs import this package for TASK_NAMES
    import pandas as pd
    from torch import nn

    from nnmamba.data.cases import RawDataset
    from pipelines.params import ReportSpec, StudySpec, TrainSpec

TASK_MODULES = {
    "segmentation": "pipelines.tasks.segmentation",
    "landmark": "pipelines.tasks.landmark",
    "classification": "pipelines.tasks.classification",
}
TASK_NAMES = tuple(TASK_MODULES)

Scored = list[tuple[dict, Any]]   # per test case: (its row of the per-case table, what `save` writes)


@dataclass(frozen=True)
class Evaluator:
    """A task's test-time work: `score` (one Ray task per trained model, or per fold ensemble: the
    bundles it is given predict as one, `nnmamba.ensemble`) returns a row and a
    prediction per case, `save` writes one model's predictions under `predictions/<study>/`,
    `per_seed` turns the per-case table into one row of test metrics per (variant, seed); `headline`
    names the one of them `dvc metrics show` tables per variant (summary/<study>/<variant>.json)."""

    score: Callable[[list[str], str, list[str], StudySpec], Scored]
    save: Callable[[Scored, Path, str], None]
    per_seed: Callable[[pd.DataFrame], pd.DataFrame]
    headline: str


@dataclass(frozen=True)
class Task:
    """Everything a stage does differently for one task.

    - `prepare(study, raw, out_dir)`: preprocess the raw dataset, return the dataset index.
    - `split(study, index)`: train/val/test case ids.
    - `resolve(study, index)`: the study with its dataset-dependent settings made concrete.
    - `train_loader(study, dataset_dir, index, case_ids, seed, rank, world_size, pin_memory)`: the
      training batches, finite (the loop cycles it) or endless.
    - `loss(train, name)` (`name`: the trial's `TrainSpec.loss_for`), `validate(model, dataset_dir, case_ids, study, device, dtype)` -> per-case
      records of one worker, `summarise(records of all workers)` -> `val_*` metrics, whose
      `selection_metric` picks a trial's checkpoint (`selection_mode`: max or min).
    - `input_shape(study)`: the spatial shape the network is fed (the MLflow model's example input).
    - `prediction_record(study, index)`: what `nnmamba predict` needs besides the weights to
      preprocess a raw case as `prepare` did (saved in every bundle; its `task` picks the predictor).
    - `report(studies, settings, out_dir)`: paper-shaped tables and figures of its evaluated
      studies (as params.yaml gives them, unresolved); returns the tables to print.
    - `mlflow_prefix`: the experiment of a study is `nnmamba-<prefix>-<dataset>`.
    """

    name: str
    mlflow_prefix: str
    selection_metric: str
    selection_mode: Literal["max", "min"]
    prepare: Callable[[StudySpec, RawDataset, Path], dict]
    split: Callable[[StudySpec, dict], dict[str, list[str]]]
    resolve: Callable[[StudySpec, dict], StudySpec]
    train_loader: Callable[..., Iterable[Mapping[str, Any]]]
    loss: Callable[[TrainSpec, str | None], nn.Module]
    validate: Callable[..., list[dict[str, Any]]]
    summarise: Callable[[list[dict[str, Any]]], dict[str, float]]
    input_shape: Callable[[StudySpec], Sequence[int]]
    prediction_record: Callable[[StudySpec, dict], dict]
    evaluator: Evaluator
    report: Callable[[list[StudySpec], ReportSpec, Path], list[Path]]

    def selection(self, has_validation: bool) -> tuple[str, str]:
        """The metric and mode that pick a trial's checkpoint.

        The task's validation metric; without a validation split, the epoch, so the LAST checkpoint
        is kept (the paper then reports the mean over seeds instead of selecting on validation).
        """
        return (self.selection_metric, self.selection_mode) if has_validation else ("epoch", "max")


def get_task(name: str) -> Task:
    """The task called `name`; a clear error lists the known ones."""
    if name not in TASK_MODULES:
        raise ValueError(f"unknown task {name!r}; known: {sorted(TASK_MODULES)}")
    return importlib.import_module(TASK_MODULES[name]).TASK

