"""End to end: `dvc repro` of the landmark ablation alone on a real Ray cluster, read back from files and MLflow."""

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

STUDY = "fetal_cerebellum"
NAMES = ["TCD1", "TCD2", "HDV1", "HDV2", "ADV1", "ADV2"]
VARIANTS = ["baseline", "miccss"]
SEEDS = [0, 1]
EPOCHS = 2
N_TEST = 2
TINY = {
    "synthetic": {STUDY: {"n_cases": 6}},
    "model": {"base_channels": 4, "blocks_per_stage": 2},
    "studies": {STUDY: {
        "split": {"val": 1, "test": N_TEST},
        "train": {"variants": VARIANTS, "seeds": SEEDS, "epochs": EPOCHS, "steps_per_epoch": 2},
    }},
}


@pytest.fixture(scope="module")
def repro(tmp_path_factory, ray_cluster):
    root = fresh_project(tmp_path_factory.mktemp("project"), TINY, studies=[STUDY])
    env = ray_cluster["env"]
    run_in(root, "dvc", "repro", env=env)
    return root, env


def _raw_points_ras(path) -> np.ndarray:
    """The annotation file read by hand: LPS x and y point the other way."""
    content = json.loads(path.read_text())
    sign = np.array([-1.0, -1.0, 1.0]) if content.get("coordinate_system") == "LPS" else np.ones(3)
    return np.array([content["landmarks"][n] for n in NAMES]) * sign


def test_repro_scores_the_written_predictions_against_the_raw_annotations(repro):
    root, _ = repro
    per_case = pd.read_csv(root / f"metrics/{STUDY}/test_per_case.csv")
    assert len(per_case) == len(VARIANTS) * len(SEEDS) * N_TEST
    for row in per_case.itertuples():
        predicted = json.loads((root / f"predictions/{STUDY}/{row.variant}-seed{row.seed}/{row.case_id}.json")
                               .read_text())["landmarks"]
        truth = _raw_points_ras(root / f"data/raw/synthetic/{STUDY}/landmarks/{row.case_id}.json")
        errors = np.linalg.norm(np.array([predicted[n] for n in NAMES]) - truth, axis=1)
        assert [getattr(row, f"test_mre_mm_{n}") for n in NAMES] == pytest.approx(errors.tolist(), abs=1e-6)
        assert row.test_mre_mm_mean == pytest.approx(errors.mean(), abs=1e-6)
    summary = json.loads((root / f"metrics/{STUDY}/test_summary.json").read_text())
    assert sorted(summary) == sorted(VARIANTS)
    for variant in VARIANTS:
        per_seed = per_case[per_case.variant == variant].groupby("seed")["test_mre_mm_TCD1"].mean()
        assert summary[variant]["test_mre_mm_TCD1"]["mean"] == pytest.approx(per_seed.mean())
        assert summary[variant]["test_mre_mm_TCD1"]["std"] == pytest.approx(per_seed.std(ddof=0))
        assert np.isfinite(summary[variant]["test_mre_mm_mean"]["mean"])


def test_predict_locates_a_raw_scan_as_evaluate_did(repro, tmp_path):
    """`nnmamba predict` on a raw test scan preprocesses it as `prepare` did: the same world points
    (mm) as evaluate's, from the bundle alone."""
    root, env = repro
    index = json.loads((root / f"data/preprocessed/{STUDY}/dataset.json").read_text())
    case_id = json.loads((root / f"data/splits/{STUDY}.json").read_text())["test"][0]
    raw_image = next(iter(index["cases"][case_id]["raw_images"].values()))
    result = run_in(root, "nnmamba", "predict", "-m", f"models/{STUDY}/miccss-seed0", "-i", raw_image,
                    "-o", tmp_path, "--tta", "-d", "cpu", env=env)
    assert "1 landmark file(s)" in result.stdout
    assert "InputRangeWarning" not in result.stderr   # a test scan is like the training ones
    written = json.loads(next(tmp_path.glob("*.json")).read_text())
    evaluated = json.loads((root / f"predictions/{STUDY}/miccss-seed0/{case_id}.json").read_text())
    assert written["unit"] == "mm" and list(written["landmarks"]) == NAMES
    for name in NAMES:
        assert written["landmarks"][name] == pytest.approx(evaluated["landmarks"][name], abs=1e-3)


def test_repro_writes_the_table_4_report_and_the_slices_png(repro):
    root, _ = repro
    table = (root / f"reports/{STUDY}_table.md").read_text()
    header = next(line for line in table.splitlines() if line.startswith("| Method"))
    columns = [c.strip() for c in header.strip("|").split("|")]
    assert columns[:2] == ["Method", "Params (M)"] and columns[2].startswith("GMACs 1×")
    assert columns[3:] == ["TCD 1", "TCD 2", "HDV 1", "HDV 2", "ADV 1", "ADV 2", "Average"]
    assert "| Baseline |" in table and "| +MICCSS |" in table and " ± " in table
    assert (root / f"reports/figures/{STUDY}_landmarks.png").read_bytes()[:4] == b"\x89PNG"


def test_mlflow_holds_the_landmark_ablation(repro):
    root, _ = repro
    client = MlflowClient(f"sqlite:///{root}/mlflow.db")
    parent, children = ablation_runs(client, f"nnmamba-landmark-{STUDY}", VARIANTS, SEEDS)
    for child in children:
        tags, metrics = child.data.tags, child.data.metrics
        assert tags["mlflow.parentRunId"] == parent.info.run_id
        assert tags["task"] == "landmark" and tags["dataset"] == STUDY
        assert child.data.params["train.heatmap.sigma_mm"] == "3.0"
        for key in ("train_loss", "val_mre_mm"):
            steps = [m.step for m in client.get_metric_history(child.info.run_id, key)]
            assert sorted(set(steps)) == list(range(1, EPOCHS + 1))
        assert all(f"test_mre_mm_{n}" in metrics for n in NAMES + ["mean"])
    # The per-variant summary is one table in the parent run, not metrics.
    assert parent.data.metrics == {}
    summary = pd.read_json(client.download_artifacts(parent.info.run_id, "test_summary.json"), orient="split")
    assert sorted(summary["variant"]) == sorted(VARIANTS)
    assert {"test_mre_mm_mean_mean", "test_mre_mm_ADV2_std"} <= set(summary.columns)
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    assert {f"report/{STUDY}_table.md", f"report/{STUDY}_landmarks.png"} <= artifacts


def test_logged_model_predicts_one_heatmap_per_landmark(repro):
    root, _ = repro
    mlflow.set_tracking_uri(f"sqlite:///{root}/mlflow.db")
    client = MlflowClient()
    experiment = client.get_experiment_by_name(f"nnmamba-landmark-{STUDY}")
    models = client.search_logged_models(experiment_ids=[experiment.experiment_id])
    assert len(models) == len(VARIANTS) * len(SEEDS)
    model = mlflow.pytorch.load_model(models[0].model_uri).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 1, 32, 32, 32)).shape == (1, len(NAMES), 32, 32, 32)
    assert len(client.search_model_versions(f"name = 'nnmamba-landmark-{STUDY}-nnmamba-miccss'")) == len(SEEDS)


def test_dvc_tracks_the_landmark_params(repro):
    root, env = repro
    assert "Data and pipelines are up to date" in run_in(root, "dvc", "status", env=env).stdout
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["studies"][STUDY]["train"]["heatmap"]["sigma_mm"] = 2.0
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    changed = set(json.loads(run_in(root, "dvc", "status", "--json", env=env).stdout))
    assert {f"train@{STUDY}", f"evaluate@{STUDY}"} <= changed
    assert f"synthesize@{STUDY}" not in changed
    shown = run_in(root, "dvc", "metrics", "show", env=env).stdout
    assert f"summary/{STUDY}/miccss.json" in shown and "test_mre_mm_mean" in shown
