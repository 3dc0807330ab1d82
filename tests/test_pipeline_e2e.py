"""End to end: `dvc repro` of the segmentation ablation on a real Ray cluster, read back from MLflow."""

from __future__ import annotations

import json

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from project_copy import fresh_project
from tests.conftest import ablation_runs, run_in

pytestmark = pytest.mark.slow

VARIANTS = ["baseline", "mic", "miccss"]
SEEDS = [0, 1]
EPOCHS = 2
TINY = {
    "synthetic": {"brats2023": {"n_cases": 6, "shape": [48, 48, 32]}},
    "split": {"val": 1, "test": 2},
    "model": {"base_channels": 4, "blocks_per_stage": 2},
    "train": {"variants": VARIANTS, "seeds": SEEDS, "epochs": EPOCHS, "steps_per_epoch": 2,
              "samples_per_volume": 2, "queue_length": 4},
}


@pytest.fixture(scope="module")
def repro(tmp_path_factory, ray_cluster):
    root = fresh_project(tmp_path_factory.mktemp("project"), TINY, studies=["brats2023"])
    env = ray_cluster["env"]
    done = run_in(root, "dvc", "repro", env=env)
    (root / "repro.log").write_text(done.stdout + done.stderr)
    return root, env


def test_repro_writes_metrics_reports_and_predictions(repro):
    root, _ = repro
    summary = json.loads((root / "metrics/brats2023/test_summary.json").read_text())
    assert sorted(summary) == sorted(VARIANTS)
    for variant in VARIANTS:
        for metric in ("dice", "hd95", "nsd"):
            for region in ("WT", "TC", "ET", "mean"):
                stats = summary[variant][f"test_{metric}_{region}"]
                assert np.isfinite(stats["mean"]) and stats["std"] >= 0
    table = (root / "reports/brats2023_table.md").read_text()
    assert all(label in table for label in ("Baseline", "+MIC", "+MICCSS", "Dice WT", "HD95 ET"))
    assert (root / "reports/figures/brats2023_dice.png").read_bytes()[:4] == b"\x89PNG"
    predictions = sorted((root / "predictions/brats2023").glob("*/*.nii.gz"))
    assert len(predictions) == len(VARIANTS) * len(SEEDS) * TINY["split"]["test"]


def test_mlflow_holds_the_ablation(repro):
    root, _ = repro
    client = MlflowClient(f"sqlite:///{root}/mlflow.db")
    parent, children = ablation_runs(client, "nnmamba-seg-brats2023", VARIANTS, SEEDS)
    # Closed by the stages: no run of a finished study is left RUNNING.
    assert parent.info.status == "FINISHED" and "failure" not in parent.data.tags
    assert {child.info.status for child in children} == {"FINISHED"}
    for child in children:
        tags, params, metrics = child.data.tags, child.data.params, child.data.metrics
        assert tags["mlflow.parentRunId"] == parent.info.run_id
        assert tags["task"] == "segmentation" and tags["dataset"] == "brats2023"
        assert params["variant"] == tags["variant"] and params["seed"] == tags["seed"]
        assert params["train.epochs"] == str(EPOCHS) and params["train.optimizer.lr"] == "0.002"
        assert len(params["git_commit"]) >= 40
        for key in ("train_loss", "val_dice_mean"):
            steps = [m.step for m in client.get_metric_history(child.info.run_id, key)]
            assert sorted(set(steps)) == list(range(1, EPOCHS + 1))
        # Each epoch's time splits into its train steps and its validation; start-up is logged once.
        history = {key: {m.step: m.value for m in client.get_metric_history(child.info.run_id, key)}
                   for key in ("epoch_time_s", "train_time_s", "val_time_s", "setup_time_s", "worker_launch_s",
                               "worker_imported_s", "trial_start_to_train_s", "trial_start_to_first_step_s")}
        for epoch, total in history["epoch_time_s"].items():
            parts = history["train_time_s"][epoch] + history["val_time_s"][epoch]
            assert 0 < parts <= total and total - parts < 0.5
        assert list(history["setup_time_s"]) == [1]
        assert 0 < history["setup_time_s"][1] < history["trial_start_to_train_s"][1]
        # The start-up's milestones come in order: worker process, its imports, training loop, first batch.
        assert 0 < history["worker_launch_s"][1] < history["worker_imported_s"][1] \
            < history["trial_start_to_train_s"][1] \
            < history["trial_start_to_first_step_s"][1]
        assert list(history["trial_start_to_first_step_s"]) == [1]
        for metric in ("dice", "hd95", "nsd"):
            for region in ("WT", "TC", "ET", "mean"):
                assert f"test_{metric}_{region}" in metrics
    # The per-variant summary is one table in the parent run, not 2 metrics per variant and metric.
    assert parent.data.metrics == {}
    summary = pd.read_json(client.download_artifacts(parent.info.run_id, "test_summary.json"), orient="split")
    assert sorted(summary["variant"]) == sorted(VARIANTS)
    assert {"test_dice_mean_mean", "test_hd95_ET_std"} <= set(summary.columns)
    artifacts = [a.path for a in client.list_artifacts(parent.info.run_id, "report")]
    assert "report/brats2023_table.md" in artifacts


def test_logged_model_loads_and_predicts(repro):
    root, _ = repro
    mlflow.set_tracking_uri(f"sqlite:///{root}/mlflow.db")
    client = MlflowClient()
    experiment = client.get_experiment_by_name("nnmamba-seg-brats2023")
    models = client.search_logged_models(experiment_ids=[experiment.experiment_id])
    assert len(models) == len(VARIANTS) * len(SEEDS)
    child_ids = {m.source_run_id for m in models}
    trials = json.loads((root / "models/brats2023/trials.json").read_text())["trials"]
    assert child_ids == {t["run_id"] for t in trials}
    model = mlflow.pytorch.load_model(models[0].model_uri).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 4, 32, 32, 32))
    assert out.shape == (1, 4, 32, 32, 32)
    versions = client.search_model_versions("name = 'nnmamba-seg-brats2023-nnmamba-miccss'")
    assert len(versions) == len(SEEDS)


def test_dvc_shows_one_row_per_variant_and_one_line_per_trial(repro):
    root, env = repro
    summary = json.loads((root / "metrics/brats2023/test_summary.json").read_text())
    shown = json.loads(run_in(root, "dvc", "metrics", "show", "--json", env=env).stdout)[""]["data"]
    assert {path: entry["data"] for path, entry in shown.items()} == {
        f"summary/brats2023/{variant}.json": {"metric": "test_dice_mean", "n": len(SEEDS),
                                              **summary[variant]["test_dice_mean"]} for variant in VARIANTS}
    plots = json.loads(run_in(root, "dvc", "plots", "show", "--json", env=env).stdout)
    assert not plots.get("errors")
    (curves,) = plots["data"]["metrics/brats2023/train_curves.csv"]
    series: dict[tuple, list[int]] = {}
    for point in curves["content"]["data"]["values"]:
        series.setdefault((point["trial"], point["variant"], point["seed"]), []).append(int(point["epoch"]))
    assert sorted(series) == sorted((f"{v}-seed{s}", v, str(s)) for v in VARIANTS for s in SEEDS)
    assert all(epochs == list(range(1, EPOCHS + 1)) for epochs in series.values())
    assert curves["content"]["encoding"]["color"]["field"] == "variant"


def test_dvc_tracks_params_and_metrics(repro):
    root, env = repro
    assert "Data and pipelines are up to date" in run_in(root, "dvc", "status", env=env).stdout
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["train"]["epochs"] = EPOCHS + 1
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    status = run_in(root, "dvc", "status", "--json", env=env).stdout
    changed = set(json.loads(status))
    assert "train@brats2023" in changed
    assert not changed & {"synthesize@brats2023", "prepare@brats2023", "split@brats2023"}
    diff = run_in(root, "dvc", "params", "diff", env=env).stdout
    assert "train.epochs" in diff
    shown = run_in(root, "dvc", "metrics", "show", env=env).stdout
    assert "summary/brats2023/miccss.json" in shown and "test_hd95" not in shown


def test_the_train_log_has_a_line_per_trial_event(repro):
    root, _ = repro
    log = (root / "repro.log").read_text()
    trials = [f"({variant}, seed {seed})" for variant in VARIANTS for seed in SEEDS]
    for trial in trials:
        assert log.count(f"train brats2023: {trial} started") == 1
        assert log.count(f"train brats2023: {trial} epoch ") == EPOCHS
        assert log.count(f"train brats2023: {trial} done: best val_dice_mean") == 1
    assert f"[{len(trials)} of {len(trials)} finished, 0 running]" in log
    # Neither Tune's status tables nor Ray Train's per-trial and per-epoch INFO lines, nor MLflow's
    # progress bars of each model registration.
    for noise in ("Trial status", "Reporting training result", "Checkpoint successfully created",
                  "Started training worker group", "Setting up process group", "Removed the following hyperparameter",
                  "Downloading artifacts"):
        assert noise not in log, noise
