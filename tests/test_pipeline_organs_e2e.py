"""End to end on organ datasets: `dvc repro` of AMOS CT/MR and an nnU-Net dataset of .mha files, then `nnmamba predict`.

One tiny project runs three studies on a real Ray cluster: AMOS CT split at random (scored per organ),
AMOS MR split by its own folders as in the paper profile (imagesTs is unlabelled: predicted, not
scored), and a generic nnU-Net v2 dataset written as .mha with int32 labels, two channels (CT + MR)
and 2.4 x 2.4 x 6.5 mm voxels. MLflow, the plans, the reports and the registered models are read back.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
from mlflow.tracking import MlflowClient

from nnmamba.data.synthetic.abdomen_phantom import AMOS_LABELS
from nnmamba.metrics import per_class_regions
from project_copy import fresh_project
from tests.conftest import ablation_runs, run_in, same_geometry

pytestmark = pytest.mark.slow

VARIANTS = ["baseline", "miccss"]
ORGAN_CLASSES = list(per_class_regions(AMOS_LABELS))
TINY = {
    "synthetic": {
        "amos22": {"cases": {"CT": {"imagesTr": 4, "imagesVa": 1, "imagesTs": 1},
                             "MR": {"imagesTr": 3, "imagesVa": 1, "imagesTs": 1}},
                   "field_of_view_mm": [120, 96, 96]},
        "abdomen_mha": {"layout": "nnunet", "n_train": 5, "n_test": 1, "channels": ["CT", "MR"],
                        "field_of_view_mm": [96, 80, 78], "spacing": [2.4, 2.4, 6.5], "file_ending": ".mha",
                        "label_dtype": "int32", "seed": 1},
    },
    "studies": {
        "amos_mr": {"dataset": {"reader": {"subsets": ["imagesTr", "imagesVa", "imagesTs"]}},
                    "split": {"method": "folders"}},
        "abdomen_mha": {"task": "segmentation", "init": "nnmamba/models.py",
                        "dataset": {"name": "abdomen_mha", "layout": "nnunet", "root": "data/raw/synthetic/abdomen_mha",
                                    "synthetic": "abdomen_mha"},
                        "train": {"patch_size": "auto", "batch_size": "auto", "label_probabilities": "uniform",
                                  "seeds": [0], "variants": ["miccss"]}},
    },
    "split": {"val": 1, "test": 2},
    "model": {"base_channels": 4, "blocks_per_stage": 2},
    "train": {"variants": VARIANTS, "epochs": 2, "steps_per_epoch": 2, "samples_per_volume": 2, "queue_length": 4},
}


@pytest.fixture(scope="module")
def repro(tmp_path_factory, ray_cluster):
    root = fresh_project(tmp_path_factory.mktemp("organs"), TINY, studies=["amos_ct", "amos_mr", "abdomen_mha"])
    env = ray_cluster["env"]
    run_in(root, "dvc", "repro", env=env)
    return root, env


def test_plans_and_per_class_metrics(repro):
    root, _ = repro
    for study, channels in (("amos_ct", ["CT"]), ("amos_mr", ["MR"]), ("abdomen_mha", ["CT", "MR"])):
        plan = json.loads((root / f"data/preprocessed/{study}/plan.json").read_text())
        fingerprint = json.loads((root / f"data/preprocessed/{study}/fingerprint.json").read_text())
        assert fingerprint["channels"] == channels and all(p % 16 == 0 for p in plan["patch_size"])
        assert [n["scheme"] for n in plan["normalization"]] == ["ct" if c == "CT" else "zscore" for c in channels]
        record = json.loads((root / f"models/{study}/miccss-seed0/prediction.json").read_text())
        assert record["patch_size"] == plan["patch_size"] and record["plan"] == plan
    amos_ct = json.loads((root / "metrics/amos_ct/test_summary.json").read_text())
    assert sorted(amos_ct) == sorted([*VARIANTS, "segresnet"])  # params.yaml trains SegResNet beside nnMamba
    for metric in ("dice", "hd95", "nsd"):
        for name in [*ORGAN_CLASSES, "mean"]:
            assert np.isfinite(amos_ct["miccss"][f"test_{metric}_{name}"]["mean"])
    nnunet = json.loads((root / "metrics/abdomen_mha/test_summary.json").read_text())
    assert {"test_dice_liver", "test_dice_spleen", "test_dice_kidney", "test_nsd_mean"} <= set(nnunet["miccss"])
    # AMOS MR split by its folders: imagesTr -> train, imagesVa -> val, the unlabelled imagesTs -> test.
    assert json.loads((root / "data/splits/amos_mr.json").read_text())["test"] == ["amos_0504"]
    assert json.loads((root / "metrics/amos_mr/test_summary.json").read_text()) == {}


def test_predictions_lie_in_the_raw_geometry(repro):
    root, _ = repro
    written = sorted((root / "predictions/abdomen_mha/miccss-seed0").iterdir())
    assert [p.suffix for p in written] == [".mha", ".mha"]
    for path in written:
        raw_label = root / f"data/raw/synthetic/abdomen_mha/labelsTr/{path.name}"
        labels = sitk.GetArrayFromImage(same_geometry(path, raw_label))
        assert set(np.unique(labels)) <= {0, 1, 2, 3}
    same_geometry(root / "predictions/amos_mr/miccss-seed0/amos_0504.nii.gz",
                   root / "data/raw/synthetic/amos22/imagesTs/amos_0504.nii.gz")


def test_mlflow_runs_and_reports(repro):
    root, _ = repro
    client = MlflowClient(f"sqlite:///{root}/mlflow.db")
    for study in ("amos_ct", "abdomen_mha"):
        # params.yaml trains SegResNet beside nnMamba on amos_ct: a fourth row of every table
        expected = [*VARIANTS, "segresnet"] if study == "amos_ct" else ["miccss"]
        parent, children = ablation_runs(client, f"nnmamba-seg-{study}", expected, [0])
        assert all("test_dice_liver" in r.data.metrics and "test_hd95_mean" in r.data.metrics for r in children)
        summary = pd.read_json(client.download_artifacts(parent.info.run_id, "test_summary.json"), orient="split")
        assert "test_dice_liver_mean" in summary.columns and "miccss" in set(summary["variant"])
    backbones = {r.data.tags["variant"]: r.data.tags["backbone"]
                 for r in ablation_runs(client, "nnmamba-seg-amos_ct", [*VARIANTS, "segresnet"], [0])[1]}
    assert backbones == {"baseline": "nnmamba", "miccss": "nnmamba", "segresnet": "segresnet"}
    assert client.search_model_versions("name = 'nnmamba-seg-amos_ct-segresnet'")
    table = (root / "reports/amos22_table2.md").read_text()
    for text in ("Params (M)", "GMACs 1×128×128×128", "CT-Test mDice (%)", "MR-Test mNSD (%)", "+MICCSS", "Baseline",
                 "| SegResNet |"):
        assert text in table
    assert "Dice liver" in (root / "reports/amos_ct_table.md").read_text()
    assert "No labelled test case" in (root / "reports/amos_mr_table.md").read_text()
    assert "abdomen_mha mDice (%)" in (root / "reports/nnunet_table2.md").read_text()
    for study in ("amos_ct", "amos_mr", "abdomen_mha"):
        assert (root / f"reports/figures/{study}_overlays.png").read_bytes()[:4] == b"\x89PNG"


def test_predict_from_the_model_registry(repro):
    root, env = repro
    raw = root / "data/raw/synthetic/amos22/imagesTs/amos_0504.nii.gz"
    run_in(root, "python", "-m", "pipelines.cli", "predict", "--model", "models:/nnmamba-seg-amos_mr-nnmamba-miccss/1",
           "--input", raw, "--output", root / "cli_out", "--device", "cpu", "--tracking-uri",
           f"sqlite:///{root}/mlflow.db", env=env)
    labels = sitk.GetArrayFromImage(same_geometry(root / "cli_out/amos_0504.nii.gz", raw))
    # Same model, same plan, same sliding windows: exactly what `evaluate` wrote for this case.
    evaluated = sitk.GetArrayFromImage(sitk.ReadImage(str(root / "predictions/amos_mr/miccss-seed0/amos_0504.nii.gz")))
    np.testing.assert_array_equal(labels, evaluated)
