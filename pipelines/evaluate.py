"""DVC stage `evaluate@<study>`: every trained model on the test split, metrics in the raw geometry.

One Ray task per trial (CPU or GPU, from `evaluate.resources`) runs sliding-window inference on
each test case and scores it against the raw annotation: a segmentation is mapped back onto the
raw image grid (class probabilities where the plan resampled, nnU-Net style) and compared with the
raw label file with the voxel spacing, per region (BraTS) or per class (organ datasets, names from
dataset.json); landmark heatmaps are decoded to world points (mm) and compared with the raw points
file. Unlabelled test cases (AMOS imagesTs, scored on the challenge site) are predicted, not
scored. This driver writes the prediction files, the per-case CSV, the summary JSON (DVC metrics)
and MLflow: test metrics in each child run, mean/std over seeds in the parent run.

Classification studies take the same route with whole volumes: each model's class probabilities
per test case (`predictions/<study>/<variant>-seed<seed>.csv`), and ACC, F1 and AUC computed over
the whole test set of each seed (AUC is not a mean of per-case scores), then mean ± std over seeds.

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
from nnmamba.data.readers.landmarks import read_landmarks, write_landmarks
from nnmamba.data.preprocessing.preprocess import load_preprocessed
from nnmamba.inference import class_probabilities, predict_landmarks
from nnmamba.metrics import classification_metrics, landmark_metrics, segmentation_metrics
from nnmamba.predict import file_ending, segment_preprocessed
from pipelines.cluster import connect_ray
from pipelines.config import resolve_path, study_config, write_json
from pipelines.prepare import PREPROCESSED_ROOT
from pipelines.resolve import resolve_study
from pipelines.split import SPLITS_ROOT
from pipelines.tracking import StudyRuns
from pipelines.train import METRICS_ROOT, load_trials, trial_dir_name

PREDICTIONS_ROOT = "predictions"
SUMMARY_FILE = "test_summary.json"


def load_summary(study: str) -> dict | None:
    """evaluate@<study>'s mean ± std per variant and metric, or None while the study is not evaluated."""
    path = resolve_path(METRICS_ROOT) / study / SUMMARY_FILE
    return json.loads(path.read_text()) if path.is_file() else None


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
        first_image = Path(next(iter(entry["raw_images"].values())))
        # The raw label, read once: the grid to predict on and the truth to score against.
        truth = tio.LabelMap(entry["raw_label"]) if entry["raw_label"] is not None else None
        prediction = segment_preprocessed(model, subject["image"].data, entry["properties"],
                                          first_image if truth is None else truth,
                                          patch, overlap=evaluate["overlap"], mirror_axes=evaluate["mirror_axes"],
                                          device=device)
        row = {"case_id": case_id}
        ending = file_ending(first_image)
        if truth is not None:
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


def predict_classes(model_dir: str, dataset_dir: str, case_ids: list[str], config: dict) -> list[tuple[dict, None]]:
    """One trained classifier's class probabilities (`p_<class>`) and predicted class index per case.

    Nothing is scored per case: ACC, F1 and AUC are properties of the whole test set (see
    `classification_per_seed`), so the row carries what they are computed from.
    """
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, _ = load_bundle(Path(model_dir), device)
    index = json.loads((Path(dataset_dir) / "dataset.json").read_text())
    names = [index["labels"][str(i)] for i in range(len(index["labels"]))]
    scored = []
    for case_id in case_ids:
        entry = index["cases"][case_id]
        image = load_preprocessed(Path(dataset_dir), case_id)["image"].data
        probabilities = class_probabilities(model, image, mirror_axes=config["evaluate"]["mirror_axes"],
                                            device=device)[0].numpy()
        scored.append(({"case_id": case_id, "subject": entry["subject"], "target": entry["class_index"],
                        **{f"p_{name}": float(p) for name, p in zip(names, probabilities)},
                        "predicted": int(probabilities.argmax())}, None))
    return scored


def save_label_maps(scored: list[tuple[dict, tuple[tio.LabelMap, str]]], out_root: Path, model: str) -> None:
    """Each label map as `<model>/<case><ending>`, in the raw image's own format (.nii.gz, .nrrd, .mha, ...)."""
    (out_root / model).mkdir(parents=True, exist_ok=True)
    for row, (labels, ending) in scored:
        labels.save(out_root / model / f"{row['case_id']}{ending}")


def save_points(scored: list[tuple[dict, dict[str, list[float]]]], out_root: Path, model: str) -> None:
    """Predicted points as landmarks-layout JSON (RAS), `<model>/<case>.json`, readable by the annotations' reader."""
    (out_root / model).mkdir(parents=True, exist_ok=True)
    for row, points in scored:
        write_landmarks(out_root / model / f"{row['case_id']}.json", points)


def save_probabilities(scored: list[tuple[dict, None]], out_root: Path, model: str) -> None:
    """One model's class probabilities of every test case as `<model>.csv`."""
    out_root.mkdir(parents=True, exist_ok=True)
    pd.DataFrame([row for row, _ in scored]).to_csv(out_root / f"{model}.csv", index=False)


def metric_columns(per_case: pd.DataFrame) -> list[str]:
    return [c for c in per_case.columns if c.startswith("test_")]


def mean_per_seed(per_case: pd.DataFrame) -> pd.DataFrame:
    """Each (variant, seed)'s mean over test cases of every per-case metric (empty without labelled cases)."""
    return per_case.groupby(["variant", "seed"])[metric_columns(per_case)].mean()


def probability_columns(per_case: pd.DataFrame) -> list[str]:
    """The `p_<class>` columns of a classification per-case table, in class order."""
    return [c for c in per_case.columns if c.startswith("p_")]


def classification_per_seed(per_case: pd.DataFrame) -> pd.DataFrame:
    """ACC, F1 and AUC of each (variant, seed) over all its test cases, as `test_acc`, `test_f1`, `test_auc`."""
    columns = probability_columns(per_case)
    rows = {
        key: {f"test_{name}": value for name, value in
              classification_metrics(frame["target"].to_numpy(), frame[columns].to_numpy()).items()}
        for key, frame in per_case.groupby(["variant", "seed"])
    }
    return pd.DataFrame.from_dict(rows, orient="index").rename_axis(["variant", "seed"])


@dataclass(frozen=True)
class Evaluator:
    """A task's test-time work: scoring (a Ray task per trained model), writing its predictions, and
    turning per-case rows into one row of test metrics per (variant, seed)."""

    score: Callable[[str, str, list[str], dict], list[tuple[dict, Any]]]
    save: Callable[[list[tuple[dict, Any]], Path, str], None]
    per_seed: Callable[[pd.DataFrame], pd.DataFrame] = mean_per_seed


EVALUATORS = {
    "segmentation": Evaluator(predict_and_score, save_label_maps),
    "landmark": Evaluator(predict_landmarks_and_score, save_points),
    "classification": Evaluator(predict_classes, save_probabilities, classification_per_seed),
}


def summarise(per_seed: pd.DataFrame) -> dict:
    """Per variant: mean and std over seeds of each seed's test metrics (the paper's mean ± std)."""
    if per_seed.empty:  # no labelled test case (AMOS imagesTs): predictions only
        return {}
    summary = {}
    for variant, frame in per_seed.groupby(level="variant"):
        summary[variant] = {
            col: {"mean": float(frame[col].mean()), "std": float(frame[col].std(ddof=0))} for col in per_seed.columns
        }
    return summary


def log_to_mlflow(config: dict, trials: dict, per_seed: pd.DataFrame, summary: dict) -> None:
    """Each seed's test metrics into its child run; `<variant>_<metric>_mean/_std` into the parent run."""
    if per_seed.empty:
        return
    runs = StudyRuns(config, trials["config_hash"])
    for trial in trials["trials"]:
        runs.log_metrics(trial["run_id"], per_seed.loc[(trial["variant"], trial["seed"])].to_dict())
    parent = {f"{variant}_{col}_{stat}": value
              for variant, cols in summary.items() for col, stats in cols.items() for stat, value in stats.items()}
    runs.log_metrics(trials["parent_run_id"], parent)


def evaluate(study: str) -> dict:
    """Evaluate all of a study's trials on its test split and write predictions, CSV, JSON and MLflow."""
    config = resolve_study(study_config(study))
    trials = load_trials(study)
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
        scored = ray.get(ref)
        evaluator.save(scored, out_root, trial_dir_name(trial["variant"], trial["seed"]))
        rows += [{"variant": trial["variant"], "seed": trial["seed"], **row} for row, _ in scored]
    per_case = pd.DataFrame(rows).sort_values(["variant", "seed", "case_id"])
    metrics_dir = resolve_path(METRICS_ROOT) / study
    metrics_dir.mkdir(parents=True, exist_ok=True)
    per_case.to_csv(metrics_dir / "test_per_case.csv", index=False)
    per_seed = evaluator.per_seed(per_case)
    summary = summarise(per_seed)
    write_json(metrics_dir / SUMMARY_FILE, summary)
    log_to_mlflow(config, trials, per_seed, summary)
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
