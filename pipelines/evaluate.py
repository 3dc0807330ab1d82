"""DVC stage `evaluate@<study>`: every trained model on the test split, metrics in the raw geometry.

One Ray task per trial (CPU or GPU, from `evaluate.resources`) runs sliding-window inference on
each test case and scores it against the raw annotation: a segmentation is mapped back onto the
raw image grid (class probabilities where the plan resampled, nnU-Net style) and compared with the
raw label file with the voxel spacing, per region (BraTS) or per class (organ datasets, names from
dataset.json); landmark heatmaps are decoded to world points (mm) and compared with the raw points
file. Unlabelled test cases (AMOS imagesTs, scored on the challenge site) are predicted, not
scored. This driver writes the prediction files, the per-case CSV, the summary JSON (DVC metrics)
and MLflow: test metrics in each child run, mean/std over seeds in the parent run.

    python -m pipelines.evaluate brats2023
"""

from __future__ import annotations

import argparse
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import ray
import torch
import torchio as tio
from tqdm import tqdm

from nnmamba.checkpoint import load_bundle
from nnmamba.data.landmarks import read_landmarks, write_landmarks
from nnmamba.data.preprocess import load_preprocessed
from nnmamba.inference import predict_landmarks
from nnmamba.metrics import landmark_metrics, segmentation_metrics
from nnmamba.predict import file_ending, segment_preprocessed
from pipelines.cluster import connect_ray
from pipelines.config import resolve_path, study_config, write_json
from pipelines.prepare import PREPROCESSED_ROOT
from pipelines.resolve import resolve_study
from pipelines.split import SPLITS_ROOT
from pipelines.tracking import StudyRuns
from pipelines.train import METRICS_ROOT, MODELS_ROOT

PREDICTIONS_ROOT = "predictions"


def predict_and_score(model_dir: str, dataset_dir: str, case_ids: list[str],
                      config: dict) -> list[tuple[dict, tuple[tio.LabelMap, str]]]:
    """Score one trained model on the given cases: (metrics row, (prediction in raw geometry, raw file ending)).

    Unlabelled cases get a row with their id only.
    """
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, _ = load_bundle(Path(model_dir), device)
    evaluate, patch = config["evaluate"], config["train"]["patch_size"]
    index = json.loads((Path(dataset_dir) / "dataset.json").read_text())
    scored = []
    for case_id in case_ids:
        entry = index["cases"][case_id]
        subject = load_preprocessed(Path(dataset_dir), case_id)
        reference = Path(entry["raw_label"] or next(iter(entry["raw_images"].values())))
        prediction = segment_preprocessed(model, subject["image"].data, entry["properties"], reference, patch,
                                          overlap=evaluate["overlap"], mirror_axes=evaluate["mirror_axes"],
                                          device=device)
        row = {"case_id": case_id}
        ending = file_ending(Path(next(iter(entry["raw_images"].values()))))
        if entry["raw_label"] is not None:
            truth = tio.LabelMap(entry["raw_label"])
            metrics = segmentation_metrics(prediction.numpy()[0], truth.numpy()[0], truth.spacing,
                                           evaluate["regions"], evaluate["nsd_tolerance_mm"])
            row.update({f"test_{k}": v for k, v in metrics.items()})
        scored.append((row, (prediction, ending)))
    return scored


def predict_landmarks_and_score(model_dir: str, dataset_dir: str, case_ids: list[str],
                                config: dict) -> list[tuple[dict, dict[str, list[float]]]]:
    """Score one trained landmark model: (radial errors in mm per landmark, predicted RAS world points) per case.

    Predictions and truth are both world coordinates, so no resampling back is needed; the truth is
    read from the raw points file, not from the prepared copy.
    """
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, _ = load_bundle(Path(model_dir), device)
    evaluate, patch = config["evaluate"], config["train"]["patch_size"]
    index = json.loads((Path(dataset_dir) / "dataset.json").read_text())
    names = index["landmarks"]
    scored = []
    for case_id in case_ids:
        image = load_preprocessed(Path(dataset_dir), case_id)["image"]
        predicted = predict_landmarks(model, image.data, image.affine, patch, overlap=evaluate["overlap"],
                                      mirror_axes=evaluate["mirror_axes"], device=device)
        truth = read_landmarks(Path(index["cases"][case_id]["raw_points"]), names, case_id)
        metrics = landmark_metrics(predicted, [truth[name] for name in names], names)
        points = {name: [float(v) for v in point] for name, point in zip(names, predicted)}
        scored.append(({"case_id": case_id, **{f"test_{k}": v for k, v in metrics.items()}}, points))
    return scored


def save_label_map(prediction: tuple[tio.LabelMap, str], directory: Path, case_id: str) -> None:
    """The label map in the raw image's own format (.nii.gz, .nrrd, .mha, ...)."""
    labels, ending = prediction
    labels.save(directory / f"{case_id}{ending}")


def save_points(points: dict[str, list[float]], directory: Path, case_id: str) -> None:
    """Predicted points as a landmarks-layout JSON (RAS), readable by the same reader as the annotations."""
    write_landmarks(directory / f"{case_id}.json", points)


@dataclass(frozen=True)
class Evaluator:
    """A task's test-time scoring (run as a Ray task per trained model) and how it writes one case's prediction."""

    score: Callable[[str, str, list[str], dict], list[tuple[dict, Any]]]
    save: Callable[[Any, Path, str], None]


EVALUATORS = {
    "segmentation": Evaluator(predict_and_score, save_label_map),
    "landmark": Evaluator(predict_landmarks_and_score, save_points),
}


def summarise(per_case: pd.DataFrame) -> dict:
    """Per variant: mean and std over seeds of each seed's mean over test cases (the paper's mean ± std)."""
    metric_cols = [c for c in per_case.columns if c.startswith("test_")]
    if not metric_cols:  # no labelled test case (AMOS imagesTs): predictions only
        return {}
    per_seed = per_case.groupby(["variant", "seed"])[metric_cols].mean()
    summary = {}
    for variant, frame in per_seed.groupby(level="variant"):
        summary[variant] = {
            col: {"mean": float(frame[col].mean()), "std": float(frame[col].std(ddof=0))} for col in metric_cols
        }
    return summary


def log_to_mlflow(config: dict, trials: dict, per_case: pd.DataFrame, summary: dict) -> None:
    """Test metrics into each child run; `<variant>_<metric>_mean/_std` into the parent run."""
    runs = StudyRuns(config, trials["config_hash"])
    metric_cols = [c for c in per_case.columns if c.startswith("test_")]
    if not metric_cols:
        return
    per_seed = per_case.groupby(["variant", "seed"])[metric_cols].mean()
    for trial in trials["trials"]:
        runs.log_metrics(trial["run_id"], per_seed.loc[(trial["variant"], trial["seed"])].to_dict())
    parent = {f"{variant}_{col}_{stat}": value
              for variant, cols in summary.items() for col, stats in cols.items() for stat, value in stats.items()}
    runs.log_metrics(trials["parent_run_id"], parent)


def evaluate(study: str) -> dict:
    """Evaluate all of a study's trials on its test split and write predictions, CSV, JSON and MLflow."""
    config = resolve_study(study_config(study))
    trials = json.loads((resolve_path(MODELS_ROOT) / study / "trials.json").read_text())
    test_cases = json.loads((resolve_path(SPLITS_ROOT) / f"{study}.json").read_text())["test"]
    dataset_dir = str(resolve_path(PREPROCESSED_ROOT) / study)
    connect_ray(config)
    evaluator = EVALUATORS[config["task"]]
    task = ray.remote(**_task_resources(config["evaluate"]["resources"]))(evaluator.score)
    pending = {task.remote(t["model_dir"], dataset_dir, test_cases, config): t for t in trials["trials"]}

    out_root = resolve_path(PREDICTIONS_ROOT) / study
    shutil.rmtree(out_root, ignore_errors=True)
    rows = []
    for ref in tqdm(_as_completed(list(pending)), total=len(pending), desc=f"evaluate {study}", unit="model"):
        trial = pending[ref]
        for row, prediction in ray.get(ref):
            name = f"{trial['variant']}-seed{trial['seed']}"
            (out_root / name).mkdir(parents=True, exist_ok=True)
            evaluator.save(prediction, out_root / name, row["case_id"])
            rows.append({"variant": trial["variant"], "seed": trial["seed"], **row})
    per_case = pd.DataFrame(rows).sort_values(["variant", "seed", "case_id"])
    metrics_dir = resolve_path(METRICS_ROOT) / study
    metrics_dir.mkdir(parents=True, exist_ok=True)
    per_case.to_csv(metrics_dir / "test_per_case.csv", index=False)
    summary = summarise(per_case)
    write_json(metrics_dir / "test_summary.json", summary)
    log_to_mlflow(config, trials, per_case, summary)
    return summary


def _task_resources(resources: dict) -> dict:
    """params.yaml's {CPU: n, GPU: m} in the keyword form ray.remote takes."""
    return {"num_cpus": resources.get("CPU", 1), "num_gpus": resources.get("GPU", 0)}


def _as_completed(refs: list):
    """Yield object refs as their tasks finish, so progress shows as models complete."""
    while refs:
        done, refs = ray.wait(refs, num_returns=1)
        yield done[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("study", help="key under `studies` in params.yaml")
    evaluate(parser.parse_args().study)


if __name__ == "__main__":
    main()
