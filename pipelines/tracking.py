"""MLflow bookkeeping: one experiment per study, a parent run per ablation, a child run per trial.

Only driver processes write here (the train, evaluate and report stages), never Ray workers, so a
local SQLite store is safe. Runs are looked up by tags before being created, so a restarted stage
continues its parent and child runs instead of duplicating them.

The experiments are created with their artifact location named here: MLflow's default for a
database store is `./mlruns` of the process's working directory, which for a job submitted with
`ray job submit --working-dir` is Ray's temporary copy of the code, deleted with the Ray session
(and every logged and registered model with it).
"""

from __future__ import annotations

import os
import re
import subprocess
import urllib.parse
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import Experiment
from mlflow.store.db.db_types import DATABASE_ENGINES
from mlflow.tracking import MlflowClient
from mlflow.utils.file_utils import local_file_uri_to_path

from pipelines import workspace
from pipelines.params import MlflowSpec, StudySpec
from pipelines.tasks import get_task


def tracking_uri(settings: MlflowSpec) -> str:
    """MLFLOW_TRACKING_URI wins; a relative sqlite path in params.yaml is taken from the workspace."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or settings.tracking_uri
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri[len(prefix):].startswith("/"):
        uri = prefix + str(workspace.resolve(uri[len(prefix):]))
    return uri


# The experiment tag MLflow 3's UI reads and writes (its experiment-type selector) for what an
# experiment holds: model training runs here, not GenAI traces.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
ARTIFACTS = "mlruns"          # a database store's artifacts: beside its SQLite file, else in the workspace
RAY_PACKAGE_PREFIX = "_ray_pkg_"   # Ray's name for a job's uploaded, temporary copy of the code


def artifact_root(uri: str) -> Path | None:
    """Where the experiments this project creates in the store at `uri` keep their artifacts:
    `mlruns/` beside a SQLite file, the workspace's `mlruns/` for another database, None for a
    tracking server or file store (their own artifact store decides)."""
    scheme = urllib.parse.urlparse(uri).scheme.split("+")[0]
    if scheme == "sqlite":
        return workspace.resolve(Path(uri[len("sqlite:///"):]).parent / ARTIFACTS)
    return workspace.resolve(ARTIFACTS) if scheme in DATABASE_ENGINES else None


def check_artifact_location(experiment: Experiment) -> None:
    """Refuse an experiment whose artifacts live in a Ray job's temporary copy of the code (created by
    an older version of this module): what it logs would be deleted with the Ray session."""
    location = experiment.artifact_location
    if urllib.parse.urlparse(location).scheme not in ("", "file"):
        return
    if any(part.startswith(RAY_PACKAGE_PREFIX) for part in Path(local_file_uri_to_path(location)).parts):
        raise RuntimeError(
            f"MLflow experiment '{experiment.name}' (id {experiment.experiment_id}) keeps its artifacts in "
            f"{location}, a Ray job's temporary copy of the code that Ray deletes: rename it "
            f"(mlflow experiments rename --experiment-id {experiment.experiment_id} --new-name "
            f"'{experiment.name}-lost') and run again to start one whose artifacts stay in the workspace")


def experiment_name(study: StudySpec) -> str:
    """`nnmamba-<task>-<dataset>`, or the study's own `dataset.experiment` when it sets one."""
    return study.dataset.experiment or f"nnmamba-{get_task(study.task).mlflow_prefix}-{study.dataset.name}"


def git_commit() -> str:
    """The commit the code ran at (with '-dirty' when the tree has changes), or 'unknown' outside git."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=workspace.REPO_ROOT, capture_output=True,
                                text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=workspace.REPO_ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{commit}-dirty" if dirty else commit


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

    def __init__(self, study: StudySpec, config_digest: str):
        self.uri = tracking_uri(study.mlflow)
        mlflow.set_tracking_uri(self.uri)
        self.client = MlflowClient(self.uri)
        self.experiment_id = self._experiment(experiment_name(study))
        self.study = study.name
        self.task = study.task
        self.dataset = study.dataset.name
        self.digest = config_digest

    def _experiment(self, name: str) -> str:
        """The id of experiment `name`, created with its artifacts under `artifact_root` when missing,
        and marked as model training (`EXPERIMENT_KIND`), an existing one included."""
        experiment = self.client.get_experiment_by_name(name)
        if experiment is None:
            root = artifact_root(self.uri)
            location = None if root is None else str(root / re.sub(r"[^\w.-]+", "_", name))
            return self.client.create_experiment(name, artifact_location=location, tags=EXPERIMENT_KIND)
        check_artifact_location(experiment)
        for key, value in EXPERIMENT_KIND.items():
            if experiment.tags.get(key) != value:
                self.client.set_experiment_tag(experiment.experiment_id, key, value)
        return experiment.experiment_id

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
        else:  # a re-run of the stage: open again until this run ends
            self.client.update_run(run_id, status="RUNNING")
        return run_id

    def end(self, run_id: str, error: BaseException | None = None) -> None:
        """Close a run: FINISHED, or FAILED with the error's first line as its `failure` tag."""
        if error is not None:
            reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
            self.client.set_tag(run_id, "failure", f"{type(error).__name__}: {reason}"[:5000])
        self.client.set_terminated(run_id, "FAILED" if error is not None else "FINISHED")

    def child(self, parent_id: str, backbone: str, variant: str, seed: int, fold: int | None,
              params: Mapping[str, str]) -> str:
        """The trial's run under the parent (`variant`: nnMamba's, or the backbone's name; `fold` in a
        k-fold study); params are logged once, at creation."""
        name = workspace.trial_name(variant, seed, fold)
        grid = {"backbone": backbone, "variant": variant, "seed": str(seed),
                **({} if fold is None else {"fold": str(fold)})}
        tags = {**self._base_tags(), "run_type": "trial", **grid, "trial": name, "mlflow.parentRunId": parent_id}
        run_id = self._find(tags)
        if run_id is None:
            run = self.client.create_run(self.experiment_id, tags=tags, run_name=name)
            run_id = run.info.run_id
            self._log_params(run_id, {**params, **grid})
        return run_id

    def children(self, parent_id: str) -> dict[str, str]:
        """All trial runs under a parent, keyed by trial name (`workspace.trial_name`)."""
        runs = self.client.search_runs(
            [self.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'", max_results=10000
        )
        return {r.data.tags["trial"]: r.info.run_id for r in runs}

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


def attach_to_parent_run(study: StudySpec, files: list[Path]) -> None:
    """Log report files into the study's MLflow parent run, when the study has been trained."""
    if not workspace.path(workspace.TRIALS, study=study.name).is_file():
        return
    trials = workspace.load_trials(study.name)
    runs = StudyRuns(study, trials["config_hash"])
    for file in files:
        runs.client.log_artifact(trials["parent_run_id"], str(file), artifact_path="report")
