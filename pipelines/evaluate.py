"""DVC stage `evaluate@<study>`: every trained model on the test split, metrics in the raw geometry.

One Ray task per trial (CPU or GPU, from `evaluate.resources`) runs sliding-window inference on
each test case, maps the prediction back onto the raw image grid and scores it against the raw
label file with the voxel spacing. This driver writes the prediction files, the per-case CSV,
the summary JSON (DVC metrics) and MLflow: test metrics in each child run, mean/std over seeds in
the parent run.

Classification studies take the same route with whole volumes: each model's class probabilities
per test case (`predictions/<study>/<variant>-seed<seed>.csv`), and ACC, F1 and AUC computed over
the whole test set of each seed (AUC is not a mean of per-case scores), then mean ± std over seeds.

    python -m pipelines.evaluate brats2023
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import pandas as pd
import ray
import torch
import torchio as tio
from tqdm import tqdm

from nnmamba.checkpoint import load_bundle
from nnmamba.data.preprocess import load_preprocessed, to_raw_geometry
from nnmamba.inference import class_probabilities, predict_labels
from nnmamba.metrics import classification_metrics, segmentation_metrics
from pipelines.cluster import connect_ray
from pipelines.config import resolve_path, study_config, write_json
from pipelines.prepare import PREPROCESSED_ROOT
from pipelines.split import SPLITS_ROOT
from pipelines.tracking import StudyRuns
from pipelines.train import METRICS_ROOT, MODELS_ROOT

PREDICTIONS_ROOT = "predictions"


def predict_and_score(model_dir: str, dataset_dir: str, case_ids: list[str], config: dict) -> list[tuple[dict, tio.LabelMap]]:
    """Score one trained model on the given cases: (metrics row, prediction in raw geometry) per case."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, _ = load_bundle(Path(model_dir), device)
    evaluate, patch = config["evaluate"], config["train"]["patch_size"]
    index = json.loads((Path(dataset_dir) / "dataset.json").read_text())
    scored = []
    for case_id in case_ids:
        entry = index["cases"][case_id]
        subject = load_preprocessed(Path(dataset_dir), case_id)
        labels = predict_labels(model, subject["image"].data, patch, overlap=evaluate["overlap"],
                                mirror_axes=evaluate["mirror_axes"], device=device)
        prediction = to_raw_geometry(labels.to(torch.uint8), entry["properties"], Path(entry["raw_label"]))
        truth = tio.LabelMap(entry["raw_label"])
        metrics = segmentation_metrics(prediction.numpy()[0], truth.numpy()[0], truth.spacing,
                                       evaluate["regions"], evaluate["nsd_tolerance_mm"])
        scored.append(({"case_id": case_id, **{f"test_{k}": v for k, v in metrics.items()}}, prediction))
    return scored


def summarise(per_case: pd.DataFrame) -> dict:
    """Per variant: mean and std over seeds of each seed's mean over test cases (the paper's mean ± std)."""
    metric_cols = [c for c in per_case.columns if c.startswith("test_")]
    return summarise_seeds(per_case.groupby(["variant", "seed"])[metric_cols].mean())


def summarise_seeds(per_seed: pd.DataFrame) -> dict:
    """Per variant: mean and std over seeds of each metric of a (variant, seed)-indexed frame."""
    summary = {}
    for variant, frame in per_seed.groupby(level="variant"):
        summary[variant] = {
            col: {"mean": float(frame[col].mean()), "std": float(frame[col].std(ddof=0))} for col in per_seed.columns
        }
    return summary


def log_to_mlflow(config: dict, trials: dict, per_case: pd.DataFrame, summary: dict) -> None:
    """Test metrics into each child run; `<variant>_<metric>_mean/_std` into the parent run."""
    metric_cols = [c for c in per_case.columns if c.startswith("test_")]
    log_seeds_to_mlflow(config, trials, per_case.groupby(["variant", "seed"])[metric_cols].mean(), summary)


def log_seeds_to_mlflow(config: dict, trials: dict, per_seed: pd.DataFrame, summary: dict) -> None:
    """Each seed's test metrics into its child run; the summary into the parent run."""
    runs = StudyRuns(config, trials["config_hash"])
    for trial in trials["trials"]:
        runs.log_metrics(trial["run_id"], per_seed.loc[(trial["variant"], trial["seed"])].to_dict())
    parent = {f"{variant}_{col}_{stat}": value
              for variant, cols in summary.items() for col, stats in cols.items() for stat, value in stats.items()}
    runs.log_metrics(trials["parent_run_id"], parent)


def predict_classes(model_dir: str, dataset_dir: str, case_ids: list[str], config: dict) -> list[dict]:
    """One trained classifier's class probabilities and prediction for each case (a per-case row each)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, _ = load_bundle(Path(model_dir), device)
    index = json.loads((Path(dataset_dir) / "dataset.json").read_text())
    names = [index["labels"][str(i)] for i in range(len(index["labels"]))]
    rows = []
    for case_id in case_ids:
        entry = index["cases"][case_id]
        image = load_preprocessed(Path(dataset_dir), case_id)["image"].data
        probabilities = class_probabilities(model, image, mirror_axes=config["evaluate"]["mirror_axes"],
                                            device=device)[0].numpy()
        rows.append({"case_id": case_id, "subject": entry["subject"], "target": entry["class_index"],
                     **{f"p_{name}": float(p) for name, p in zip(names, probabilities)},
                     "predicted": int(probabilities.argmax())})
    return rows


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


def evaluate_classification(study: str, config: dict) -> dict:
    """Every trained classifier on the test split: predictions CSVs, per-case CSV, summary JSON, MLflow."""
    trials = json.loads((resolve_path(MODELS_ROOT) / study / "trials.json").read_text())
    test_cases = json.loads((resolve_path(SPLITS_ROOT) / f"{study}.json").read_text())["test"]
    dataset_dir = str(resolve_path(PREPROCESSED_ROOT) / study)
    connect_ray(config)
    task = ray.remote(**_task_resources(config["evaluate"]["resources"]))(predict_classes)
    pending = {task.remote(t["model_dir"], dataset_dir, test_cases, config): t for t in trials["trials"]}
    out_root = resolve_path(PREDICTIONS_ROOT) / study
    shutil.rmtree(out_root, ignore_errors=True)
    out_root.mkdir(parents=True)
    frames = []
    for ref in tqdm(_as_completed(list(pending)), total=len(pending), desc=f"evaluate {study}", unit="model"):
        trial = pending[ref]
        frame = pd.DataFrame(ray.get(ref))
        frame.to_csv(out_root / f"{trial['variant']}-seed{trial['seed']}.csv", index=False)
        frames.append(frame.assign(variant=trial["variant"], seed=trial["seed"]))
    per_case = pd.concat(frames)
    per_case = per_case[["variant", "seed", *[c for c in per_case.columns if c not in ("variant", "seed")]]]
    per_case = per_case.sort_values(["variant", "seed", "case_id"])
    metrics_dir = resolve_path(METRICS_ROOT) / study
    metrics_dir.mkdir(parents=True, exist_ok=True)
    per_case.to_csv(metrics_dir / "test_per_case.csv", index=False)
    per_seed = classification_per_seed(per_case)
    summary = summarise_seeds(per_seed)
    write_json(metrics_dir / "test_summary.json", summary)
    log_seeds_to_mlflow(config, trials, per_seed, summary)
    return summary


TASK_EVALUATORS = {"classification": evaluate_classification}


def evaluate(study: str) -> dict:
    """Evaluate all of a study's trials on its test split and write predictions, CSV, JSON and MLflow."""
    config = study_config(study)
    if config["task"] in TASK_EVALUATORS:
        return TASK_EVALUATORS[config["task"]](study, config)
    trials = json.loads((resolve_path(MODELS_ROOT) / study / "trials.json").read_text())
    test_cases = json.loads((resolve_path(SPLITS_ROOT) / f"{study}.json").read_text())["test"]
    dataset_dir = str(resolve_path(PREPROCESSED_ROOT) / study)
    connect_ray(config)
    task = ray.remote(**_task_resources(config["evaluate"]["resources"]))(predict_and_score)
    pending = {task.remote(t["model_dir"], dataset_dir, test_cases, config): t for t in trials["trials"]}

    out_root = resolve_path(PREDICTIONS_ROOT) / study
    shutil.rmtree(out_root, ignore_errors=True)
    rows = []
    for ref in tqdm(_as_completed(list(pending)), total=len(pending), desc=f"evaluate {study}", unit="model"):
        trial = pending[ref]
        for row, prediction in ray.get(ref):
            name = f"{trial['variant']}-seed{trial['seed']}"
            (out_root / name).mkdir(parents=True, exist_ok=True)
            prediction.save(out_root / name / f"{row['case_id']}.nii.gz")
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
