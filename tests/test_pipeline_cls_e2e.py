"""End to end: `dvc repro` of the two chained ADNI classification studies on a real Ray cluster.

NC vs AD trains from scratch with a validation split; sMCI vs pMCI starts from its models with no
validation split (last epoch kept) and a learning rate of 0, so its weights must equal the NC-vs-AD
weights of the same variant and seed exactly: that shows the transfer, not just the DVC edge.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
import torchio as tio
import yaml
from mlflow.tracking import MlflowClient

from nnmamba.checkpoint import load_bundle
from project_copy import fresh_project
from tests.conftest import ablation_runs, run_in

pytestmark = pytest.mark.slow

VARIANTS = ["sequence"]  # the other variants differ only in the network (tests/test_models_cls.py)
SEEDS = [0, 1]
EPOCHS = 2
TEST_CASES = 4
SMALL_VOLUMES = {"prepare": {"spacing": [3.0, 3.0, 3.0], "shape": [16, 16, 16]}}
GRID = {"variants": VARIANTS, "seeds": SEEDS, "epochs": EPOCHS, "steps_per_epoch": 2}
TINY = {
    "synthetic": {"adni": {"subjects": {"NC": 5, "AD": 5, "sMCI": 5, "pMCI": 5}, "shape": [32, 32, 24],
                           "spacing": [1.5, 1.5, 2.0]}},
    "studies": {
        "adni_ad": {**SMALL_VOLUMES, "split": {"val": 2, "test": TEST_CASES}, "train": GRID},
        "adni_mci": {**SMALL_VOLUMES, "split": {"val": 0, "test": TEST_CASES},
                     "train": {**GRID, "optimizer": {"lr": 0.0}}},
    },
    "model": {"base_channels": 4, "blocks_per_stage": 1},
}
STUDIES = ("adni_ad", "adni_mci")


@pytest.fixture(scope="module")
def repro(tmp_path_factory, ray_cluster):
    root = fresh_project(tmp_path_factory.mktemp("project"), TINY, studies=STUDIES)
    run_in(root, "dvc", "repro", env=ray_cluster["env"])
    return root, ray_cluster["env"]


def test_dvc_chains_the_transfer_study_to_the_source_models(repro):
    root, env = repro
    assert "train@adni_ad" in run_in(root, "dvc", "dag", "--dot", "train@adni_mci", env=env).stdout
    lock = yaml.safe_load((root / "dvc.lock").read_text())
    assert "models/adni_ad" in [dep["path"] for dep in lock["stages"]["train@adni_mci"]["deps"]]
    assert "Data and pipelines are up to date" in run_in(root, "dvc", "status", env=env).stdout


def parameters(model_dir) -> dict[str, torch.Tensor]:
    model, _ = load_bundle(model_dir)
    return dict(model.named_parameters())


def test_transfer_study_starts_from_the_same_variant_and_seed(repro):
    root, _ = repro
    source = {(v, s): parameters(root / f"models/adni_ad/{v}-seed{s}") for v in VARIANTS for s in SEEDS}
    for (variant, seed), weights in source.items():
        transferred = parameters(root / f"models/adni_mci/{variant}-seed{seed}")
        assert all(torch.equal(transferred[name], value) for name, value in weights.items()), (variant, seed)
    first, second = (source[("sequence", s)] for s in SEEDS)
    assert not all(torch.equal(first[name], second[name]) for name in first)
    # No validation split: the last epoch is the selected one.
    trials = json.loads((root / "models/adni_mci/trials.json").read_text())["trials"]
    assert [t["best_epoch"] for t in trials] == [EPOCHS] * len(VARIANTS) * len(SEEDS)


def by_hand(frame: pd.DataFrame, positive: str) -> dict[str, float]:
    """ACC, F1 and AUC of one model's test predictions, without scikit-learn."""
    target, score, predicted = frame["target"].to_numpy(), frame[positive].to_numpy(), frame["predicted"].to_numpy()
    tp = int(((predicted == 1) & (target == 1)).sum())
    fp, fn = int(((predicted == 1) & (target == 0)).sum()), int(((predicted == 0) & (target == 1)).sum())
    pairs = [(p > n) + 0.5 * (p == n) for p in score[target == 1] for n in score[target == 0]]
    return {"test_acc": float((predicted == target).mean()), "test_f1": 2 * tp / (2 * tp + fp + fn),
            "test_auc": float(np.mean(pairs))}


@pytest.mark.parametrize("study, positive", [("adni_ad", "p_AD"), ("adni_mci", "p_pMCI")])
def test_metrics_are_the_test_predictions_scored(repro, study, positive):
    root, _ = repro
    per_case = pd.read_csv(root / f"metrics/{study}/test_per_case.csv")
    split = json.loads((root / f"data/splits/{study}.json").read_text())
    summary = json.loads((root / f"metrics/{study}/test_summary.json").read_text())
    per_seed = {}
    for (variant, seed), frame in per_case.groupby(["variant", "seed"]):
        assert sorted(frame["case_id"]) == split["test"]
        predictions = pd.read_csv(root / f"predictions/{study}/{variant}-seed{seed}.csv")
        assert predictions.sort_values("case_id")[positive].tolist() == frame.sort_values("case_id")[positive].tolist()
        per_seed[(variant, seed)] = by_hand(frame, positive)
    for variant in VARIANTS:
        for metric in ("test_acc", "test_f1", "test_auc"):
            values = [per_seed[(variant, seed)][metric] for seed in SEEDS]
            assert summary[variant][metric]["mean"] == pytest.approx(np.mean(values))
            assert summary[variant][metric]["std"] == pytest.approx(np.std(values))
    client = MlflowClient(f"sqlite:///{root}/mlflow.db")
    trials = json.loads((root / f"models/{study}/trials.json").read_text())["trials"]
    for trial in trials:
        logged = client.get_run(trial["run_id"]).data.metrics
        expected = per_seed[(trial["variant"], trial["seed"])]
        assert {k: logged[k] for k in expected} == pytest.approx(expected)


def test_predict_classifies_raw_scans_as_evaluate_did(repro, tmp_path):
    """`nnmamba predict` on a folder of raw test scans: the class probabilities evaluate wrote."""
    root, env = repro
    index = json.loads((root / "data/preprocessed/adni_ad/dataset.json").read_text())
    test = json.loads((root / "data/splits/adni_ad.json").read_text())["test"]
    scans = tmp_path / "scans"
    scans.mkdir()
    for case_id in test:
        raw = Path(next(iter(index["cases"][case_id]["raw_images"].values())))
        shutil.copy(raw, scans / f"{case_id}{''.join(raw.suffixes)}")
    result = run_in(root, "nnmamba", "predict", "-m", f"models/adni_ad/{VARIANTS[0]}-seed0", "-i", scans,
                    "-o", tmp_path / "out", "-d", "cpu", "--tta", env=env)
    assert f"the class probabilities of {len(test)} case(s) (probabilities.csv)" in result.stdout
    assert "InputRangeWarning" not in result.stderr   # the test scans are like the training ones
    written = pd.read_csv(tmp_path / "out/probabilities.csv").sort_values("case_id")
    evaluated = pd.read_csv(root / f"predictions/adni_ad/{VARIANTS[0]}-seed0.csv").sort_values("case_id")
    assert written["case_id"].tolist() == evaluated["case_id"].tolist()
    for column in ("p_NC", "p_AD"):
        assert written[column].tolist() == pytest.approx(evaluated[column].tolist(), abs=1e-5)
    assert written["predicted"].tolist() == [["NC", "AD"][i] for i in evaluated["predicted"]]


def test_predict_warns_on_a_scan_in_a_signed_ct_like_scale(repro, tmp_path):
    """The classifier was trained on magnitude MR (non-negative): a scan shifted by -1000 is classified,
    with a warning that names its file."""
    root, env = repro
    index = json.loads((root / "data/preprocessed/adni_ad/dataset.json").read_text())
    case_id = json.loads((root / "data/splits/adni_ad.json").read_text())["test"][0]
    raw = tio.ScalarImage(next(iter(index["cases"][case_id]["raw_images"].values())))
    shifted = tmp_path / "scans" / "shifted.nii.gz"
    shifted.parent.mkdir()
    tio.ScalarImage(tensor=raw.data.float() - 1000.0, affine=raw.affine).save(shifted)
    result = run_in(root, "nnmamba", "predict", "-m", f"models/adni_ad/{VARIANTS[0]}-seed0", "-i", shifted.parent,
                    "-o", tmp_path / "out", "-d", "cpu", env=env)
    assert "InputRangeWarning: case shifted (" in result.stderr and str(shifted) in result.stderr
    assert "non-negative" in result.stderr
    assert pd.read_csv(tmp_path / "out/probabilities.csv")["case_id"].tolist() == ["shifted"]


@pytest.mark.parametrize("study", STUDIES)
def test_mlflow_holds_each_study_as_an_ablation(repro, study):
    root, _ = repro
    mlflow.set_tracking_uri(f"sqlite:///{root}/mlflow.db")
    client = MlflowClient()
    parent, children = ablation_runs(client, f"nnmamba-cls-adni-{study}", VARIANTS, SEEDS)
    for child in children:
        tags, params = child.data.tags, child.data.params
        assert tags["mlflow.parentRunId"] == parent.info.run_id
        assert (tags["task"], tags["dataset"], tags["study"]) == ("classification", "adni", study)
        assert params["train.epochs"] == str(EPOCHS) and params["model.d_state"] == "8"
        steps = [m.step for m in client.get_metric_history(child.info.run_id, "train_loss")]
        assert sorted(set(steps)) == list(range(1, EPOCHS + 1))
        val_steps = [m.step for m in client.get_metric_history(child.info.run_id, "val_auc")]
        assert val_steps == ([] if study == "adni_mci" else list(range(1, EPOCHS + 1)))
    # The per-variant summary is one table in the parent run, not metrics.
    assert parent.data.metrics == {}
    summary = pd.read_json(client.download_artifacts(parent.info.run_id, "test_summary.json"), orient="split")
    assert sorted(summary["variant"]) == sorted(VARIANTS)
    assert {f"test_{m}_{s}" for m in ("acc", "f1", "auc") for s in ("mean", "std")} <= set(summary.columns)
    artifacts = [a.path for a in client.list_artifacts(parent.info.run_id, "report")]
    assert {"report/adni_classification_table.md", f"report/{study}_roc.png"} <= set(artifacts)
    models = client.search_logged_models(experiment_ids=[parent.info.experiment_id])
    assert len(models) == len(VARIANTS) * len(SEEDS)
    model = mlflow.pytorch.load_model(models[0].model_uri).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 1, 16, 16, 16)).shape == (1, 2)
    assert len(client.search_model_versions(f"name = 'nnmamba-cls-adni-{study}-nnmamba-sequence'")) == len(SEEDS)


def test_report_puts_both_tasks_side_by_side(repro):
    root, _ = repro
    table = (root / "reports/adni_classification_table.md").read_text()
    header = next(line for line in table.splitlines() if line.startswith("| Method"))
    columns = [c.strip() for c in header.strip("|").split("|")]
    assert columns[:2] == ["Method", "Params (M)"] and columns[2].startswith("GMACs 1×")
    assert columns[3:] == ["NC vs AD ACC", "NC vs AD F1", "NC vs AD AUC", "sMCI vs pMCI ACC", "sMCI vs pMCI F1",
                           "sMCI vs pMCI AUC"]
    summary = json.loads((root / "metrics/adni_mci/test_summary.json").read_text())
    auc = summary["sequence"]["test_auc"]
    row = next(line for line in table.splitlines() if line.startswith("| +Sequence"))
    assert row.rstrip(" |").endswith(f"{auc['mean'] * 100:.2f} ± {auc['std'] * 100:.2f}")
    for study in STUDIES:
        assert (root / f"reports/figures/{study}_roc.png").read_bytes()[:4] == b"\x89PNG"


def test_table5_takes_the_auc_column_from_adni_ad(repro):
    root, _ = repro
    table = (root / "reports/ablation_table5.md").read_text()
    summary = json.loads((root / "metrics/adni_ad/test_summary.json").read_text())
    auc = summary["sequence"]["test_auc"]
    row = next(line for line in table.splitlines() if "| +Sequence |" in line)
    assert row.rstrip(" |").endswith(f"{auc['mean'] * 100:.2f} ± {auc['std'] * 100:.2f}")
    assert (root / "reports/figures/ablation_table5.png").read_bytes()[:4] == b"\x89PNG"
