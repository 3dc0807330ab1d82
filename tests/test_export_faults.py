"""The train stage's export on a full disk (#16 item 4), on real files and a real MLflow store:
the trials' checkpoints as Ray Tune leaves them, exported by pipelines.train.export_models."""

from __future__ import annotations

import errno

import pytest
from mlflow.tracking import MlflowClient

from full_disk import FullDisk, leftovers, snapshot
from nnmamba.atomic import WriteError
from nnmamba.checkpoint import WEIGHTS_FILE
from pipelines import workspace
from pipelines.params import load_params
from pipelines.tracking import StudyRuns
from pipelines.train import export_models
from project_copy import write_params
from trained_results import trained

STUDY = "brats2023"
SEEDS = [0, 1]
TINY = {"model": {"base_channels": 4, "blocks_per_stage": 1}, "train": {"variants": ["mic"], "seeds": SEEDS},
        "mlflow": {"register_models": False}}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A workspace whose study has MLflow runs (parent, one child per seed) and a first, good export.

    The tests share it (each MLflow model logged costs seconds): a failing export must leave it as it was.
    """
    root = tmp_path_factory.mktemp("workspace")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(workspace.WORKSPACE_ENV, str(root))
        patch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root}/mlflow.db")
        patch.chdir(root)                             # MLflow's default artifact root is ./mlruns
        write_params(root, TINY, studies=[STUDY])
        study = load_params(root / "params.yaml").study(STUDY)
        runs = StudyRuns(study, "digest")
        parent = runs.parent({})
        for seed in SEEDS:
            child = runs.child(parent, "nnmamba", "mic", seed, None, {})
            runs.log_metrics(child, {"train_loss": 1.0 - seed / 10, "val_dice_mean": 0.5}, step=1)
        rows = export_models(study, trained(study, root, 1, dict.fromkeys(SEEDS, 0.5)), runs, parent)
        yield {"root": root, "study": study, "runs": runs, "parent": parent, "rows": rows, "before": outputs()}


@pytest.fixture
def full_disk(exported, monkeypatch):
    """Fill the disk of a folder of the shared workspace: `full_disk("models", free_bytes)`, for this test."""
    return lambda folder, free: FullDisk(monkeypatch, exported["root"] / folder, free)


def outputs() -> dict[str, dict[str, bytes]]:
    return {"models": snapshot(workspace.path(workspace.MODELS, study=STUDY)),
            "curves": snapshot(workspace.path(workspace.TRAIN_CURVES, study=STUDY))}


def failed_children(runs: StudyRuns, parent: str) -> list[str]:
    client = MlflowClient(runs.uri)
    statuses = {name: client.get_run(run_id) for name, run_id in runs.children(parent).items()}
    assert {run.info.status for run in statuses.values()} == {"FAILED"}
    return [run.data.tags["failure"] for run in statuses.values()]


def test_an_export_records_the_final_paths_and_finishes_the_child_runs(exported):
    models = workspace.path(workspace.MODELS, study=STUDY)
    assert sorted(exported["before"]["models"]) == ["mic-seed0/arch.json", f"mic-seed0/{WEIGHTS_FILE}",
                                                    "mic-seed1/arch.json", f"mic-seed1/{WEIGHTS_FILE}", "trials.json"]
    assert [row["model_dir"] for row in exported["rows"]] == [str(models / f"mic-seed{seed}") for seed in SEEDS]
    assert workspace.load_trials(STUDY)["trials"] == exported["rows"]
    client = MlflowClient(exported["runs"].uri)
    assert {client.get_run(row["run_id"]).info.status for row in exported["rows"]} == {"FINISHED"}
    assert leftovers(exported["root"]) == []


def test_a_full_disk_during_the_second_export_keeps_the_previous_models(exported, full_disk):
    study, runs, parent, bundle = exported["study"], exported["runs"], exported["parent"], exported["before"]["models"]
    # Room for the first trial's new bundle and half the second's weights.
    full_disk("models", len(bundle["mic-seed0/arch.json"]) + len(bundle[f"mic-seed0/{WEIGHTS_FILE}"]) * 3 // 2)
    with pytest.raises(WriteError) as error:
        export_models(study, trained(study, exported["root"], 2, dict.fromkeys(SEEDS, 0.5)), runs, parent)
    path = workspace.path(workspace.MODELS, study=STUDY) / "mic-seed1" / WEIGHTS_FILE
    assert error.value.errno == errno.ENOSPC
    assert str(error.value) == f"could not write {path}: [Errno 28] No space left on device"
    assert outputs() == exported["before"] and leftovers(exported["root"]) == []
    # The first trial's bundle was written and logged, but never swapped in: no child run is FINISHED.
    assert failed_children(runs, parent) == [f"WriteError: {error.value}"] * len(SEEDS)


def test_a_full_disk_at_the_training_curves_keeps_the_previous_models(exported, full_disk):
    study, runs, parent = exported["study"], exported["runs"], exported["parent"]
    full_disk("metrics", 0)
    with pytest.raises(WriteError, match="train_curves.csv: .Errno 28. No space left on device"):
        export_models(study, trained(study, exported["root"], 3, dict.fromkeys(SEEDS, 0.5)), runs, parent)
    assert outputs() == exported["before"] and leftovers(exported["root"]) == []
    failed_children(runs, parent)
