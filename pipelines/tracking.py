"""MLflow bookkeeping: one experiment per study, a parent run per ablation, a child run per trial.

Only driver processes write here (the train, evaluate and report stages), never Ray workers, so a
local SQLite store is safe. Runs are looked up by tags before being created, so a restarted stage
continues its parent and child runs instead of duplicating them.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import mlflow
from mlflow.tracking import MlflowClient

from pipelines.config import resolve_path

TASK_PREFIX = {"segmentation": "seg", "classification": "cls", "landmark": "landmark"}


def tracking_uri(config: Mapping) -> str:
    """MLFLOW_TRACKING_URI wins; a relative sqlite path in params.yaml is taken from the workspace."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or config["mlflow"]["tracking_uri"]
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri[len(prefix):].startswith("/"):
        uri = prefix + str(resolve_path(uri[len(prefix):]))
    return uri


def experiment_name(config: Mapping) -> str:
    """`nnmamba-<task>-<dataset>`, or the study's own `dataset.experiment` when it sets one."""
    dataset = config["dataset"]
    return dataset.get("experiment") or f"nnmamba-{TASK_PREFIX[config['task']]}-{dataset['name']}"


def flatten(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested params as MLflow wants them: {"train.optimizer.lr": "0.002", ...}."""
    flat: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = str(value)
    return flat


class StudyRuns:
    """Find-or-create the parent and child runs of one study's ablation in one experiment."""

    def __init__(self, config: Mapping, config_digest: str):
        self.uri = tracking_uri(config)
        mlflow.set_tracking_uri(self.uri)
        self.client = MlflowClient(self.uri)
        name = experiment_name(config)
        experiment = self.client.get_experiment_by_name(name)
        self.experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(name)
        self.study = config["study"]
        self.task = config["task"]
        self.dataset = config["dataset"]["name"]
        self.digest = config_digest

    def _find(self, tags: Mapping[str, str]) -> str | None:
        query = " and ".join(f"tags.`{key}` = '{value}'" for key, value in tags.items())
        runs = self.client.search_runs([self.experiment_id], filter_string=query, max_results=1)
        return runs[0].info.run_id if runs else None

    def _base_tags(self) -> dict[str, str]:
        return {"study": self.study, "task": self.task, "dataset": self.dataset, "config_hash": self.digest}

    def parent(self, params: Mapping[str, str]) -> str:
        """The ablation's parent run for this configuration (created, with params, on first use)."""
        tags = {**self._base_tags(), "run_type": "ablation"}
        run_id = self._find(tags)
        if run_id is None:
            run = self.client.create_run(self.experiment_id, tags=tags, run_name=f"{self.study}-ablation-{self.digest}")
            run_id = run.info.run_id
            self._log_params(run_id, params)
        return run_id

    def child(self, parent_id: str, variant: str, seed: int, params: Mapping[str, str]) -> str:
        """The (variant, seed) trial's run under the parent; params are logged once, at creation."""
        tags = {**self._base_tags(), "run_type": "trial", "variant": variant, "seed": str(seed),
                "mlflow.parentRunId": parent_id}
        run_id = self._find(tags)
        if run_id is None:
            run = self.client.create_run(self.experiment_id, tags=tags, run_name=f"{variant}-seed{seed}")
            run_id = run.info.run_id
            self._log_params(run_id, {**params, "variant": variant, "seed": str(seed)})
        return run_id

    def children(self, parent_id: str) -> dict[tuple[str, int], str]:
        """All trial runs under a parent, keyed by (variant, seed)."""
        runs = self.client.search_runs(
            [self.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'", max_results=10000
        )
        return {(r.data.tags["variant"], int(r.data.tags["seed"])): r.info.run_id for r in runs}

    def _log_params(self, run_id: str, params: Mapping[str, str]) -> None:
        items = [mlflow.entities.Param(key, value) for key, value in params.items()]
        for start in range(0, len(items), 100):
            self.client.log_batch(run_id, params=items[start:start + 100])

    def log_metrics(self, run_id: str, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Log numeric metrics in one batch at `step`."""
        entities = [
            mlflow.entities.Metric(key, float(value), mlflow.utils.time.get_current_time_millis(), step or 0)
            for key, value in metrics.items()
        ]
        self.client.log_batch(run_id, metrics=entities)
