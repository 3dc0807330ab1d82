"""Where MLflow artifacts land (#16 item 5): beside the store, never in the process's working directory.

A job submitted with `ray job submit --working-dir` runs in Ray's temporary copy of the code; MLflow's
default artifact root for a SQLite store is `./mlruns` of that directory. Real SQLite stores here;
tests/test_cluster_job.py submits a real job, stops Ray and loads the registered model afterwards.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from pipelines.params import load_params
from pipelines.tracking import StudyRuns, experiment_name

STUDY = load_params().study("brats2023")


@pytest.fixture
def store(tmp_path, monkeypatch) -> str:
    """A fresh SQLite store, and a working directory elsewhere (as a Ray job's copy of the code is)."""
    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    (tmp_path / "store").mkdir()
    (tmp_path / "job_copy").mkdir()
    monkeypatch.chdir(tmp_path / "job_copy")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


def test_artifacts_land_beside_the_store_whatever_the_working_directory(store, tmp_path):
    runs = StudyRuns(STUDY, "digest")
    experiment = runs.client.get_experiment(runs.experiment_id)
    assert Path(experiment.artifact_location) == tmp_path / "store" / "mlruns" / experiment_name(STUDY)
    child = runs.child(runs.parent({}), "nnmamba", "mic", 0, None, {})
    (tmp_path / "note.txt").write_text("kept")
    runs.client.log_artifact(child, str(tmp_path / "note.txt"))
    assert [p.read_text() for p in (tmp_path / "store" / "mlruns").rglob("note.txt")] == ["kept"]
    assert not list((tmp_path / "job_copy").rglob("note.txt"))


def test_an_experiment_whose_artifacts_are_in_a_ray_job_copy_is_refused(store):
    lost = "/tmp/ray/session_1/runtime_resources/working_dir_files/_ray_pkg_0123abcd/mlruns/1"
    experiment_id = MlflowClient(store).create_experiment(experiment_name(STUDY), artifact_location=lost)
    with pytest.raises(RuntimeError) as refused:
        StudyRuns(STUDY, "digest")
    message = str(refused.value)
    assert f"'{experiment_name(STUDY)}' (id {experiment_id})" in message and lost in message
    assert f"mlflow experiments rename --experiment-id {experiment_id}" in message and "\n" not in message
