"""A study's `auto` settings made concrete from its prepared dataset, for every stage that trains or predicts.

- `train.patch_size: auto` / `train.batch_size: auto`: the plan's (`data/preprocessed/<study>/plan.json`);
  explicit values still win.
- `train.label_probabilities: uniform`: every label of the dataset, background included, equally
  likely as the centre of a patch (nnU-Net-style oversampling of rare organs).
- no `evaluate.regions`: one region per foreground class of the dataset, named after dataset.json
  (organ datasets report `test_dice_<organ>`; BraTS names its overlapping regions explicitly).
"""

from __future__ import annotations

import json
from pathlib import Path

from nnmamba.metrics import per_class_regions
from pipelines.config import resolve_path
from pipelines.prepare import PLAN_FILE, PREPROCESSED_ROOT

AUTO = "auto"


def prepared_dir(study: str) -> Path:
    return resolve_path(PREPROCESSED_ROOT) / study


def load_plan(study: str) -> dict | None:
    """The study's plan, or None for studies that are not planned."""
    path = prepared_dir(study) / PLAN_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def resolve_study(config: dict) -> dict:
    """A copy of the study config with `auto`/`uniform`/missing regions replaced (see the module doc)."""
    study = config["study"]
    plan = load_plan(study)
    train = dict(config["train"])
    for key in ("patch_size", "batch_size"):
        if train.get(key) == AUTO:
            if plan is None:
                raise ValueError(f"study {study}: train.{key} is 'auto' but the study has no plan ({PLAN_FILE})")
            train[key] = plan[key]
    if config["task"] != "segmentation":
        return {**config, "train": train}
    index = json.loads((prepared_dir(study) / "dataset.json").read_text())
    if train.get("label_probabilities") == "uniform":
        train["label_probabilities"] = {int(value): 1 for value in index["labels"]}
    evaluate = dict(config["evaluate"])
    if not evaluate.get("regions"):
        evaluate["regions"] = per_class_regions(index["labels"])
    return {**config, "train": train, "evaluate": evaluate}
