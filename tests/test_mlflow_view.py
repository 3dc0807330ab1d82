"""What a researcher sees in MLflow (#17 item 1), on a real SQLite store and real exported models:
experiments marked as model training, the parent run's per-variant table instead of a metric per
variant and statistic, registered versions that say which trial they are, and `models:/<name>@best`."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient

from nnmamba.checkpoint import load_bundle
from pipelines import workspace
from pipelines.cli import load_model
from pipelines.evaluate import log_to_mlflow, summarise
from pipelines.params import load_params
from pipelines.registry import BEST_ALIAS
from pipelines.tracking import EXPERIMENT_KIND, StudyRuns, experiment_name
from pipelines.train import export_models, registered_name
from project_copy import write_params
from trained_results import INDEX, trained

STUDY = "brats2023"
SEEDS = [0, 1, 2]
TINY = {"model": {"base_channels": 4, "blocks_per_stage": 1}, "train": {"variants": ["mic"], "seeds": SEEDS},
        "mlflow": {"register_models": True}}
# What `nnmamba predict` reads beside the weights (its content is not under test here).
PREDICTION = {"task": "segmentation", "channels": INDEX["channels"], "labels": INDEX["labels"], "plan": {},
              "patch_size": [16, 16, 16], "overlap": 0.5}
KIND_KEY, MODEL_TRAINING = next(iter(EXPERIMENT_KIND.items()))


@pytest.fixture(scope="module")
def workspace_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("workspace")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(workspace.WORKSPACE_ENV, str(root))
        patch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root}/mlflow.db")
        patch.chdir(root)
        write_params(root, TINY, studies=[STUDY])
        yield root


@pytest.fixture(scope="module")
def study(workspace_root):
    return load_params(workspace_root / "params.yaml").study(STUDY)


@pytest.fixture(scope="module")
def exported(study, workspace_root):
    """A first export of three seeds (seed 1 validates best), then a re-run of the same checkpoints."""
    runs = StudyRuns(study, "digest")
    parent = runs.parent({"git_commit": "abc123"})
    for seed in SEEDS:
        runs.child(parent, "nnmamba", "mic", seed, None, {"git_commit": "abc123"})
    results = trained(study, workspace_root, 1, dict(zip(SEEDS, [0.4, 0.7, 0.5])), best_epoch=3,
                      prediction=PREDICTION)
    rows = export_models(study, results, runs, parent)
    name = registered_name(study, results[0].config["trial"])
    before = {v.version: (v.tags, v.description) for v in runs.client.search_model_versions(f"name = '{name}'")}
    rows_again = export_models(study, results, runs, parent)
    return {"runs": runs, "parent": parent, "rows": rows, "rows_again": rows_again, "name": name, "before": before}


def test_experiments_are_marked_as_model_training_new_and_existing(study, workspace_root):
    client = MlflowClient(f"sqlite:///{workspace_root}/mlflow.db")
    runs = StudyRuns(study, "digest")
    assert client.get_experiment(runs.experiment_id).tags[KIND_KEY] == MODEL_TRAINING
    client.delete_experiment_tag(runs.experiment_id, KIND_KEY)   # an experiment created before this tag
    StudyRuns(study, "digest")
    assert client.get_experiment_by_name(experiment_name(study)).tags[KIND_KEY] == MODEL_TRAINING


def test_every_version_says_which_trial_it_is_and_best_is_the_best_validation(exported):
    client, name = exported["runs"].client, exported["name"]
    versions = {v.tags["seed"]: v for v in client.search_model_versions(f"name = '{name}'")}
    assert sorted(versions) == ["0", "1", "2"]
    for seed, score in zip(SEEDS, ["0.4", "0.7", "0.5"]):
        version = versions[str(seed)]
        assert {key: version.tags[key] for key in ("study", "backbone", "variant", "selection_metric",
                                                   "selection_value", "best_epoch", "git_commit")} == {
            "study": STUDY, "backbone": "nnmamba", "variant": "mic", "selection_metric": "val_dice_mean",
            "selection_value": score, "best_epoch": "3", "git_commit": "abc123"}
        assert "fold" not in version.tags       # not a k-fold study
        assert version.description.startswith(f"{STUDY} mic-seed{seed} (nnmamba): best val_dice_mean {score}")
    best = client.get_model_version_by_alias(name, BEST_ALIAS)
    assert best.version == versions["1"].version and best.run_id == exported["rows"][1]["run_id"]


def test_a_re_export_of_the_same_checkpoints_adds_no_version_and_keeps_the_record(exported):
    client, name = exported["runs"].client, exported["name"]
    after = {v.version: (v.tags, v.description) for v in client.search_model_versions(f"name = '{name}'")}
    assert after == exported["before"] and len(after) == len(SEEDS)
    assert exported["rows_again"] == exported["rows"]


def test_new_checkpoints_move_best_to_the_new_best_version(exported, study, workspace_root):
    runs, name = exported["runs"], exported["name"]
    rescored = trained(study, workspace_root, 2, dict(zip(SEEDS, [0.9, 0.2, 0.3])), best_epoch=3, prediction=PREDICTION)
    export_models(study, rescored, runs, exported["parent"])
    best = runs.client.get_model_version_by_alias(name, BEST_ALIAS)
    assert best.tags["seed"] == "0" and best.tags["selection_value"] == "0.9"
    assert len(runs.client.search_model_versions(f"name = '{name}'")) == 2 * len(SEEDS)


def test_predict_loads_a_model_by_its_best_alias(exported, workspace_root):
    client, name = exported["runs"].client, exported["name"]
    best = client.get_model_version_by_alias(name, BEST_ALIAS)
    model, record = load_model(f"models:/{name}@{BEST_ALIAS}", torch.device("cpu"), f"sqlite:///{workspace_root}/mlflow.db")
    row = next(r for r in workspace.load_trials(STUDY)["trials"] if r["run_id"] == best.run_id)
    expected, _ = load_bundle(workspace.resolve(row["model_dir"]))
    loaded, reference = model.state_dict(), expected.state_dict()
    assert record == PREDICTION
    assert loaded.keys() == reference.keys() and all(torch.equal(loaded[k], reference[k]) for k in loaded)


def test_the_parent_run_holds_a_per_variant_table_not_a_metric_per_variant(exported, study):
    runs, parent = exported["runs"], exported["parent"]
    per_seed = pd.DataFrame({"variant": ["mic"] * 3 + ["baseline"] * 3, "seed": SEEDS * 2,
                             "test_dice_mean": [0.5, 0.6, 0.7, 0.1, 0.2, 0.3]}).set_index(["variant", "seed"])
    trials = {"parent_run_id": parent, "config_hash": "digest",
              "trials": [{"variant": "mic", "seed": seed, "fold": None, "run_id": row["run_id"]}
                         for seed, row in zip(SEEDS, exported["rows"])]}
    log_to_mlflow(study, trials, per_seed.loc[["mic"]], summarise(per_seed), {})
    assert runs.client.get_run(parent).data.metrics == {}
    table = pd.read_json(runs.client.download_artifacts(parent, "test_summary.json"), orient="split")
    assert table.set_index("variant")["test_dice_mean_mean"].round(6).to_dict() == {"baseline": 0.2, "mic": 0.6}
    assert runs.client.get_run(exported["rows"][2]["run_id"]).data.metrics["test_dice_mean"] == 0.7

