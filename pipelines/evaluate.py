"""DVC stage `evaluate@<study>`: every trained model on the test split, metrics in the raw geometry.

One Ray task per trained model (CPU or GPU, from `evaluate.resources`) runs its task's scoring
(pipelines/tasks/): sliding-window inference on each test case, scored against the raw
annotation (segmentation: label maps mapped back onto the raw grid, per region or class;
landmarks: world points against the raw points file; classification: class probabilities, with
ACC, F1 and AUC over the whole test set of each seed). This driver writes the predictions, the
per-case CSV, the summary JSON (DVC metrics: mean ± std over seeds per variant) and MLflow: test
metrics in each child run, mean/std over seeds in the parent run.

    python -m pipelines.evaluate brats2023
"""

from __future__ import annotations

import argparse
import shutil

import pandas as pd
import ray
from tqdm import tqdm

from pipelines import workspace
from pipelines.cluster import connect_ray
from pipelines.params import StudySpec, load_params
from pipelines.resolve import resolve_study
from pipelines.tasks import get_task
from pipelines.tasks.scoring import trial_key, trial_keys
from pipelines.tracking import StudyRuns


def summarise(per_seed: pd.DataFrame) -> dict:
    """Per variant: mean and std over seeds (and folds) of each trial's test metrics (the paper's mean ± std)."""
    if per_seed.empty:  # no labelled test case (AMOS imagesTs): predictions only
        return {}
    summary = {}
    for variant, frame in per_seed.groupby(level="variant"):
        summary[variant] = {
            col: {"mean": float(frame[col].mean()), "std": float(frame[col].std(ddof=0))} for col in per_seed.columns
        }
    return summary


def log_to_mlflow(study: StudySpec, trials: dict, per_seed: pd.DataFrame, summary: dict) -> None:
    """Each seed's test metrics into its child run; `<variant>_<metric>_mean/_std` into the parent run."""
    if per_seed.empty:
        return
    runs = StudyRuns(study, trials["config_hash"])
    for trial in trials["trials"]:
        runs.log_metrics(trial["run_id"], per_seed.loc[trial_key(trial, per_seed.index.names)].to_dict())
    parent = {f"{variant}_{col}_{stat}": value
              for variant, cols in summary.items() for col, stats in cols.items() for stat, value in stats.items()}
    runs.log_metrics(trials["parent_run_id"], parent)


def evaluate(name: str) -> dict:
    """Evaluate all of a study's trials on its test split and write predictions, CSV, JSON and MLflow."""
    study = resolve_study(load_params().study(name))
    trials = workspace.load_trials(name)
    test_cases = workspace.load_split(name)["test"]
    dataset_dir = str(workspace.path(workspace.PREPROCESSED, study=name))
    connect_ray(study.ray)
    evaluator = get_task(study.task).evaluator
    resources = study.evaluate.resources
    score = ray.remote(num_cpus=resources.get("CPU", 1), num_gpus=resources.get("GPU", 0))(evaluator.score)
    pending = {score.remote(t["model_dir"], dataset_dir, test_cases, study): t for t in trials["trials"]}

    out_root = workspace.path(workspace.PREDICTIONS, study=name)
    shutil.rmtree(out_root, ignore_errors=True)
    rows = []
    for ref in tqdm(_as_completed(list(pending)), total=len(pending), desc=f"evaluate {name}", unit="model"):
        trial = pending[ref]
        scored = ray.get(ref)
        evaluator.save(scored, out_root, workspace.trial_name(trial["variant"], trial["seed"], trial["fold"]))
        grid = {"variant": trial["variant"], "seed": trial["seed"],
                **({} if trial["fold"] is None else {"fold": trial["fold"]})}
        rows += [{**grid, **row} for row, _ in scored]
    per_case = pd.DataFrame(rows)
    per_case = per_case.sort_values([*trial_keys(per_case), "case_id"])
    per_case_file = workspace.path(workspace.TEST_PER_CASE, study=name)
    per_case_file.parent.mkdir(parents=True, exist_ok=True)
    per_case.to_csv(per_case_file, index=False)
    per_seed = evaluator.per_seed(per_case)
    summary = summarise(per_seed)
    workspace.write_json(workspace.path(workspace.TEST_SUMMARY, study=name), summary)
    log_to_mlflow(study, trials, per_seed, summary)
    return summary


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
