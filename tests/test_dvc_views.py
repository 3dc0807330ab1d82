"""What `dvc plots show` and `dvc metrics show` make of the stages' files, in a real git+DVC copy of
the project: one line per trial in the training curves, the report figures as images, one row per
variant in the metrics table."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from nnmamba.atomic import staged
from pipelines import workspace
from pipelines.evaluate import headline, stage_headline, summarise
from pipelines.params import load_params
from pipelines.reports.figures import figure_path
from pipelines.reports.segmentation import dice_chart
from pipelines.tracking import StudyRuns
from pipelines.train import training_curves
from project_copy import fresh_project

STUDY = "brats2023"
TRIALS = [("baseline", 0), ("baseline", 1), ("miccss", 0), ("miccss", 1)]
EPOCHS = 3
DVC = Path(sys.executable).parent / "dvc"


def dvc_json(root: Path, *args: str) -> dict:
    done = subprocess.run([DVC, *args, "--json"], cwd=root, capture_output=True, text=True, check=True)
    return json.loads(done.stdout)


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A copy of the project whose train@, evaluate@ and report outputs of one study are written by the
    real writers: the curves from a real MLflow store, the headline through the evaluate stage's
    staging, a report figure by the report's own chart."""
    root = fresh_project(tmp_path_factory.mktemp("project"), studies=[STUDY])
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(workspace.WORKSPACE_ENV, str(root))
        patch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root}/mlflow.db")
        study = load_params().study(STUDY)
        runs = StudyRuns(study, "digest")
        rows = []
        for variant, seed in TRIALS:
            run_id = runs.client.create_run(runs.experiment_id).info.run_id
            for epoch in range(1, EPOCHS + 1):
                runs.client.log_metric(run_id, "train_loss", 1 / epoch, step=epoch)
                runs.client.log_metric(run_id, "val_dice_mean", 0.1 * epoch + seed / 100, step=epoch)
            rows.append({"run_id": run_id, "variant": variant, "seed": seed, "fold": None})
        with staged() as staging:
            staging.file(workspace.path(workspace.TRAIN_CURVES, study=STUDY),
                         training_curves(runs, rows, "val_dice_mean"))
            per_seed = pd.DataFrame(
                [{"variant": v, "seed": s, "test_dice_mean": 0.5 + s / 10, "test_dice_WT": 0.6, "test_hd95_WT": 9.0}
                 for v, s in TRIALS]
            ).set_index(["variant", "seed"])
            stage_headline(staging, study, per_seed)
            staging.file(workspace.path(workspace.TEST_SUMMARY, study=STUDY), workspace.json_text({"detail": 1}))
        dice_chart(STUDY, summarise(per_seed), ["WT"], figure_path(root / workspace.REPORTS, f"{STUDY}_dice.png"))
    return root


def test_headline_is_the_selection_metric_mean_std_and_n_per_variant():
    per_seed = pd.DataFrame({"variant": ["a", "a", "a", "b"], "seed": [0, 1, 2, 0],
                             "test_dice_mean": [0.2, 0.4, 0.6, 0.7], "test_nsd_WT": [1.0] * 4}
                            ).set_index(["variant", "seed"])
    result = headline(per_seed, "test_dice_mean")
    assert result["a"] == pytest.approx({"metric": "test_dice_mean", "mean": 0.4, "std": (0.08 / 3) ** 0.5, "n": 3})
    assert result["b"] == {"metric": "test_dice_mean", "mean": 0.7, "std": 0.0, "n": 1}
    assert headline(pd.DataFrame(), "test_dice_mean") == {}


def test_dvc_metrics_show_is_one_row_per_variant(project):
    shown = dvc_json(project, "metrics", "show")[""]["data"]   # "": the workspace
    files = {Path(path).relative_to("summary").as_posix(): entry["data"] for path, entry in shown.items()}
    assert files == {
        f"{STUDY}/baseline.json": {"metric": "test_dice_mean", "mean": pytest.approx(0.55), "std": pytest.approx(0.05),
                                   "n": 2},
        f"{STUDY}/miccss.json": {"metric": "test_dice_mean", "mean": pytest.approx(0.55), "std": pytest.approx(0.05),
                                 "n": 2},
    }  # test_summary.json's detail is a plain output, not in the table


def test_dvc_plots_show_draws_one_line_per_trial_coloured_by_variant(project):
    plots = dvc_json(project, "plots", "show")
    assert not plots.get("errors")
    (curves,) = plots["data"][workspace.TRAIN_CURVES.format(study=STUDY)]
    spec = curves["content"]
    encoding = spec["encoding"]
    assert encoding["x"]["field"] == "epoch" and encoding["y"]["field"] == "val_dice_mean"
    assert encoding["color"]["field"] == "variant"
    lines = {field["field"] for field in encoding["detail"]} | {encoding["color"]["field"],
                                                                encoding["strokeDash"]["field"]}
    series: dict[tuple, list[int]] = {}
    for point in spec["data"]["values"]:
        series.setdefault(tuple(point[field] for field in sorted(lines)), []).append(int(point["epoch"]))
    trials = {workspace.trial_name(variant, seed) for variant, seed in TRIALS}
    assert {dict(zip(sorted(lines), key))["trial"] for key in series} == trials
    assert len(series) == len(trials) and all(epochs == [1, 2, 3] for epochs in series.values())


def test_dvc_plots_show_has_the_report_figures_as_images(project, tmp_path):
    rendered = tmp_path / "plots"
    subprocess.run([DVC, "plots", "show", "-o", rendered], cwd=project, capture_output=True, check=True)
    figure = f"reports/figures/{STUDY}_dice.png"
    assert figure in (rendered / "index.html").read_text()
    (copy,) = (rendered / "static").glob(f"*{STUDY}_dice.png")
    assert copy.read_bytes() == (project / figure).read_bytes()
