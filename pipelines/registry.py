"""The MLflow model registry's bookkeeping: what each registered version is, and which one is `best`.

A registered model holds one grid row of a study (`<experiment>-<backbone>[-<variant>]`,
pipelines/train.py `registered_name`), one version per seed (and fold). Each version carries the
tags that say which trial it is and how it was selected, and a one-line description; the alias
`best` names the version with the best validation score of the row's latest export, so it is the
row's (the variant's) champion: `nnmamba predict --model models:/<name>@best`. Everything here is
set again on every export, so a re-run that logs no new model still leaves the registry complete.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from mlflow.entities.model_registry import ModelVersion
from mlflow.tracking import MlflowClient

BEST_ALIAS = "best"


def latest_version(client: MlflowClient, name: str, run_id: str) -> ModelVersion | None:
    """The newest version of registered model `name` logged from run `run_id` (a re-exported trial
    has one version per checkpoint it logged), None when the run registered none."""
    versions = client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    return max(versions, key=lambda version: int(version.version), default=None)


def describe(client: MlflowClient, version: ModelVersion, tags: Mapping[str, str], description: str) -> None:
    """Tag a version (study, grid point, selection metric, commit) and set its description."""
    for key, value in tags.items():
        client.set_model_version_tag(version.name, version.version, key, value)
    client.update_model_version(version.name, version.version, description=description)


def set_best(client: MlflowClient, scored: Iterable[tuple[ModelVersion, float]], mode: str) -> None:
    """Point each registered model's `best` alias at its version with the best score (`mode`: max
    or min; the first of equal ones)."""
    best: dict[str, tuple[ModelVersion, float]] = {}
    for version, score in scored:
        current = best.get(version.name)
        if current is None or (score > current[1] if mode == "max" else score < current[1]):
            best[version.name] = (version, score)
    for name, (version, _) in best.items():
        client.set_registered_model_alias(name, BEST_ALIAS, version.version)
