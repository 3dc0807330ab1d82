"""End to end: `dvc repro` of a 2-fold cross-validated study with two backbones, its folds also scored as one\nensemble per (backbone, seed), read back from disk and MLflow."""

from __future__ import annotations

import json

import pytest
from mlflow.tracking import MlflowClient

from project_copy import fresh_project
from tests.conftest import run_in

pytestmark = pytest.mark.slow

FOLDS, SEEDS = 2, [0]
ROWS = {"miccss": "nnmamba", "nnunet": "nnunet"}   # table row -> backbone
TINY = {
    "synthetic": {"brats2023": {"n_cases": 8, "shape": [48, 48, 32]}},
    "split": {"method": "kfold", "folds": FOLDS, "test": 2},
    "evaluate": {"ensemble_folds": True},
    "model": {"base_channels": 4, "blocks_per_stage": 2},
    "train": {"backbones": ["nnmamba", "nnunet"], "variants": ["miccss"], "seeds": SEEDS, "epochs": 1, "steps_per_epoch": 2, "samples_per_volume": 2,
              "queue_length": 4},
}


@pytest.fixture(scope="module")
def repro(tmp_path_factory, ray_cluster):
    root = fresh_project(tmp_path_factory.mktemp("backbones"), TINY, studies=["brats2023"])
    run_in(root, "dvc", "repro", env=ray_cluster["env"])
    return root


def test_the_folds_partition_the_training_cases_by_patient(repro):
    split = json.loads((repro / "data/splits/brats2023.json").read_text())
    assert len(split["folds"]) == FOLDS and split["val"] == [] and len(split["test"]) == 2
    assert sorted(c for fold in split["folds"] for c in fold) == sorted(split["train"])
    assert not set(split["test"]) & set(split["train"])


def test_nnunet_is_built_from_the_plans_spacing_with_deep_supervision(repro):
    plan = json.loads((repro / "data/preprocessed/brats2023/plan.json").read_text())
    arch = json.loads((repro / "models/brats2023/nnunet-seed0-fold0/arch.json").read_text())
    assert arch["backbone"] == "nnunet" and arch["kwargs"]["spacing"] == plan["target_spacing"]
    assert arch["input_shape"] == [32, 32, 32]


def test_every_backbone_fold_and_seed_is_a_trial_with_its_run_model_and_predictions(repro):
    trials = json.loads((repro / "models/brats2023/trials.json").read_text())["trials"]
    cells = sorted((t["backbone"], t["variant"], t["seed"], t["fold"]) for t in trials)
    assert cells == sorted((b, r, s, f) for r, b in ROWS.items() for s in SEEDS for f in range(FOLDS))
    client = MlflowClient(f"sqlite:///{repro}/mlflow.db")
    experiment = client.get_experiment_by_name("nnmamba-seg-brats2023")
    runs = client.search_runs([experiment.experiment_id], "tags.run_type = 'trial'")
    assert sorted((r.data.tags["backbone"], r.data.tags["variant"], int(r.data.tags["seed"]), int(r.data.tags["fold"]))
                  for r in runs) == cells
    assert all("test_dice_mean" in r.data.metrics for r in runs)
    for row in ROWS:
        for fold in range(FOLDS):
            assert (repro / f"models/brats2023/{row}-seed0-fold{fold}/model.pt").is_file()
            assert len(list((repro / f"predictions/brats2023/{row}-seed0-fold{fold}").glob("*.nii.gz"))) == 2


def test_the_table_has_a_row_per_backbone_with_its_size_and_the_mean_over_folds(repro):
    summary = json.loads((repro / "metrics/brats2023/test_summary.json").read_text())
    assert sorted(summary) == sorted(ROWS)
    per_case = (repro / "metrics/brats2023/test_per_case.csv").read_text().splitlines()
    assert per_case[0].startswith("variant,seed,fold,case_id")
    table = (repro / "reports/brats2023_table.md").read_text()
    header = next(line for line in table.splitlines() if line.startswith("| Method"))
    assert "| Params (M) | GMACs 1×32×32×32 |" in header
    assert "| +MICCSS |" in table and "| nnU-Net |" in table


def test_each_rows_folds_are_also_scored_as_one_ensemble(repro):
    ensemble = json.loads((repro / "metrics/brats2023/test_ensemble_summary.json").read_text())
    assert sorted(ensemble) == sorted(ROWS)
    assert all(0.0 <= ensemble[row]["test_dice_mean"]["mean"] <= 1.0 for row in ROWS)
    per_case = (repro / "metrics/brats2023/test_ensemble_per_case.csv").read_text().splitlines()
    assert per_case[0].startswith("variant,seed,case_id") and len(per_case) == 1 + len(ROWS) * 2
    for row in ROWS:
        assert len(list((repro / f"predictions/brats2023/{row}-seed0-ensemble").glob("*.nii.gz"))) == 2
    client = MlflowClient(f"sqlite:///{repro}/mlflow.db")
    experiment = client.get_experiment_by_name("nnmamba-seg-brats2023")
    parent = client.search_runs([experiment.experiment_id], "tags.run_type = 'ablation'")[0]
    assert "test_ensemble_summary.json" in [a.path for a in client.list_artifacts(parent.info.run_id)]
