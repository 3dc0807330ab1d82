"""Every artifact path of the pipeline, and the readers and writer of its JSON records.

The stages never build a path themselves: they ask here, so a path changes in one place (and in
dvc.yaml, whose deps and outs tests/test_workspace.py checks against these templates).

Relative paths (these templates and the data paths in params.yaml) are taken from the workspace:
the repository root, or NNMAMBA_WORKSPACE when set. A job submitted with
`ray job submit --working-dir .` runs on an uploaded copy of the code, so it names the checkout
(on storage every node sees) that holds the data and receives the outputs.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from nnmamba.atomic import write_file
from nnmamba.data.preprocessing.preprocess import DATASET_JSON

REPO_ROOT = Path(__file__).resolve().parent.parent
WORKSPACE_ENV = "NNMAMBA_WORKSPACE"

# The templates dvc.yaml spells with ${key} (the study or synthetic dataset's name).
SYNTHETIC = "data/raw/synthetic/{name}"
PREPROCESSED = "data/preprocessed/{study}"
PLAN_FILE, FINGERPRINT_FILE = "plan.json", "fingerprint.json"   # written by prepare beside dataset.json
DATASET_INDEX = PREPROCESSED + "/" + DATASET_JSON
PLAN = PREPROCESSED + "/" + PLAN_FILE
SPLIT = "data/splits/{study}.json"
MODELS = "models/{study}"
TRIALS = MODELS + "/trials.json"
METRICS = "metrics/{study}"
TRAIN_CURVES = METRICS + "/train_curves.csv"
TEST_PER_CASE = METRICS + "/test_per_case.csv"
TEST_SUMMARY = METRICS + "/test_summary.json"
TEST_ENSEMBLE_PER_CASE = METRICS + "/test_ensemble_per_case.csv"   # k-fold: each (row, seed)'s folds as one model
TEST_ENSEMBLE_SUMMARY = METRICS + "/test_ensemble_summary.json"
HEADLINE = "summary/{study}"   # DVC metrics: <variant>.json, the headline test metric's mean ± std and n
PREDICTIONS = "predictions/{study}"
REPORTS = "reports"


def root() -> Path:
    """Where relative paths live: NNMAMBA_WORKSPACE when set, else the repository root."""
    return Path(os.path.expanduser(os.environ.get(WORKSPACE_ENV) or REPO_ROOT)).resolve()


def resolve(path: str | os.PathLike) -> Path:
    """A path of params.yaml or a template here, taken from the workspace unless absolute."""
    path = Path(os.path.expanduser(str(path)))
    return path if path.is_absolute() else root() / path


def path(template: str, **fields: Any) -> Path:
    """A template of this module filled in and resolved: `path(SPLIT, study="brats2023")`."""
    return resolve(template.format(**fields))


def trial_name(variant: str, seed: int, fold: int | None = None) -> str:
    """A trial's name: its model folder, its predictions' folder and its MLflow run (`miccss-seed0`,
    `miccss-seed0-fold3` in a k-fold study)."""
    return f"{variant}-seed{seed}" + ("" if fold is None else f"-fold{fold}")


def trial_model(study: str, variant: str, seed: int, fold: int | None = None) -> Path:
    """The exported model bundle of one trial."""
    return path(MODELS, study=study) / trial_name(variant, seed, fold)


def trial_predictions(study: str, variant: str, seed: int, fold: int | None = None) -> Path:
    """One trial's test predictions (a folder of files, or `<trial>.csv` beside it for classification)."""
    return path(PREDICTIONS, study=study) / trial_name(variant, seed, fold)


def read_json(file: Path, stage: str) -> Any:
    """A JSON record; a missing one names the stage that writes it."""
    if not file.is_file():
        raise FileNotFoundError(f"{file} is missing in workspace {root()}: run `dvc repro {stage}` there, "
                                f"or set {WORKSPACE_ENV} to the checkout that holds it")
    return json.loads(file.read_text())


def load_index(study: str) -> dict:
    """prepare@<study>'s dataset.json: channels, labels or landmarks, and every case's files."""
    return read_json(path(DATASET_INDEX, study=study), f"prepare@{study}")


def load_plan(study: str) -> dict | None:
    """The study's nnU-Net-style plan, or None for studies that are not planned (landmark, classification)."""
    file = path(PLAN, study=study)
    return json.loads(file.read_text()) if file.is_file() else None


def load_split(study: str) -> dict[str, list[str]]:
    """split@<study>'s train/val/test case ids."""
    return read_json(path(SPLIT, study=study), f"split@{study}")


def load_trials(study: str) -> dict:
    """What train@<study> recorded: its MLflow parent run, config digest and one row per exported trial."""
    return read_json(path(TRIALS, study=study), f"train@{study}")


def load_summary(study: str) -> dict | None:
    """evaluate@<study>'s mean ± std per variant and metric, or None while the study is not evaluated."""
    file = path(TEST_SUMMARY, study=study)
    return json.loads(file.read_text()) if file.is_file() else None


def json_text(payload: Any) -> str:
    """A JSON record as the stages write it: indented, keys sorted, paths and dates as strings."""
    return json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n"


def write_json(file: Path, payload: Any) -> None:
    """Replace a JSON record atomically (nnmamba.atomic): a failure leaves the old one and no partial file."""
    write_file(file, json_text(payload))
