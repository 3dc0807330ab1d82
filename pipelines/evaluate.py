"""DVC stage `evaluate@<study>`: every trained model on the test split, metrics in the raw geometry.

One Ray task per trained model (CPU or GPU, from `evaluate.resources`) runs its task's scoring
(pipelines/tasks/): sliding-window inference on each test case, scored against the raw
annotation (segmentation: label maps mapped back onto the raw grid, per region or class;
landmarks: world points against the raw points file; classification: class probabilities, with
ACC, F1 and AUC over the whole test set of each seed). This driver writes the predictions, the
per-case CSV, the summary JSON (mean ± std over seeds per variant and metric), the headline
(DVC metrics, `summary/<study>/<variant>.json`: the task's headline test metric, mean ± std and
n, one row per variant in `dvc metrics show`) and MLflow: test
metrics in each child run, mean/std over seeds as the parent run's `test_summary.json` table. With `evaluate.ensemble_folds`,
a k-fold study's folds of each (row, seed) also predict as one model (their logits averaged, as
nnunetv2 ensembles folds), written beside as `test_ensemble_*` and `<trial>-ensemble/` predictions.

    python -m pipelines.evaluate brats2023
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import pandas as pd
import ray
from tqdm import tqdm

from nnmamba.atomic import Staging, WriteError, staged, write_new, writing
from pipelines import workspace
from pipelines.cluster import connect_ray
from pipelines.params import StudySpec, load_params
from pipelines.resolve import resolve_study
from pipelines.tasks import get_task
from pipelines.tasks.scoring import trial_key, trial_keys
from pipelines.tracking import StudyRuns


def summarise(per_seed: pd.DataFrame) -> dict:
    """Per variant: mean, std and number n of the trials (seeds, folds) of each test metric (the
    paper's mean ± std; n lets a report print a single trial's value as n = 1, not as ± 0.00)."""
    if per_seed.empty:  # no labelled test case (AMOS imagesTs): predictions only
        return {}
    summary = {}
    for variant, frame in per_seed.groupby(level="variant"):
        summary[variant] = {
            col: {"mean": float(frame[col].mean()), "std": float(frame[col].std(ddof=0)),
                  "n": int(frame[col].count())} for col in per_seed.columns
        }
    return summary


def headline(per_seed: pd.DataFrame, metric: str) -> dict[str, dict]:
    """Per variant, the one metric `dvc metrics show` tables: its mean and std over seeds (and folds)
    and their number n. The full summary stays in test_summary.json, out of the metrics table."""
    if per_seed.empty:
        return {}
    return {variant: {"metric": metric, "mean": float(frame[metric].mean()), "std": float(frame[metric].std(ddof=0)),
                      "n": len(frame)}
            for variant, frame in per_seed.groupby(level="variant")}


def log_to_mlflow(study: StudySpec, trials: dict, per_seed: pd.DataFrame, summary: dict,
                  ensemble_summary: dict) -> None:
    """Each seed's test metrics into its child run; the parent run gets the per-variant mean and std
    as tables (`test_summary.json`, and `test_ensemble_summary.json` for the fold ensembles) rather
    than as metrics: one single-bar chart per variant and metric would bury the children's charts."""
    runs = StudyRuns(study, trials["config_hash"])
    for name, table in (("test_summary", summary), ("test_ensemble_summary", ensemble_summary)):
        if table:
            runs.client.log_table(trials["parent_run_id"], summary_table(table), f"{name}.json")
    if per_seed.empty:
        return
    for trial in trials["trials"]:
        runs.log_metrics(trial["run_id"], per_seed.loc[trial_key(trial, per_seed.index.names)].to_dict())


def summary_table(summary: dict) -> pd.DataFrame:
    """One row per variant, a `<metric>_mean` and `<metric>_std` column per metric: the comparison
    the MLflow UI shows in the parent run's artifacts."""
    return pd.DataFrame([{"variant": variant, **{f"{col}_{stat}": value for col, stats in cols.items()
                                                 for stat, value in stats.items()}}
                         for variant, cols in summary.items()])


def fold_ensembles(trials: list[dict]) -> list[dict]:
    """Each (row, seed) trained on two or more folds, as one model: {variant, seed, fold: None, model_dirs}."""
    groups: dict[tuple[str, int], list[dict]] = defaultdict(list)
    for trial in trials:
        if trial["fold"] is not None:
            groups[trial["variant"], trial["seed"]].append(trial)
    return [{"variant": variant, "seed": seed, "fold": None,
             "model_dirs": [t["model_dir"] for t in sorted(members, key=lambda t: t["fold"])]}
            for (variant, seed), members in sorted(groups.items()) if len(members) > 1]


def score_models(jobs: list[dict], study: StudySpec, test_cases: list[str], out_root: Path, suffix: str = "",
                 desc: str = "evaluate") -> pd.DataFrame:
    """Score every job (a trial, or a fold ensemble) in a Ray task of its own, write each one's
    predictions under `out_root/<trial name><suffix>/` and return the per-case table."""
    evaluator = get_task(study.task).evaluator
    resources = study.evaluate.resources
    score = ray.remote(num_cpus=resources.get("CPU", 1), num_gpus=resources.get("GPU", 0))(evaluator.score)
    dataset_dir = str(workspace.path(workspace.PREPROCESSED, study=study.name))
    pending = {score.remote(job["model_dirs"], dataset_dir, test_cases, study): job for job in jobs}
    rows = []
    for ref in tqdm(_as_completed(list(pending)), total=len(pending), desc=f"{desc} {study.name}", unit="model"):
        job = pending[ref]
        scored = ray.get(ref)
        trial = workspace.trial_name(job["variant"], job["seed"], job["fold"]) + suffix
        with writing(out_root / trial):   # a failed write() names no file: name the trial's predictions
            evaluator.save(scored, out_root, trial)
        grid = {"variant": job["variant"], "seed": job["seed"], **({} if job["fold"] is None else {"fold": job["fold"]})}
        rows += [{**grid, **row} for row, _ in scored]
    per_case = pd.DataFrame(rows)
    return per_case.sort_values([*trial_keys(per_case), "case_id"]) if rows else per_case


def stage_results(staging: Staging, study: StudySpec, per_case: pd.DataFrame, per_case_template: str,
                  summary_template: str) -> tuple[pd.DataFrame, dict]:
    """The per-case CSV and the summary JSON (mean ± std over seeds and folds), staged to be swapped
    in with the predictions; returns (per-trial means, summary)."""
    staging.file(workspace.path(per_case_template, study=study.name), per_case.to_csv(index=False))
    per_seed = get_task(study.task).evaluator.per_seed(per_case) if not per_case.empty else pd.DataFrame()
    summary = summarise(per_seed)
    staging.file(workspace.path(summary_template, study=study.name), workspace.json_text(summary))
    return per_seed, summary


def stage_headline(staging: Staging, study: StudySpec, per_seed: pd.DataFrame) -> None:
    """`summary/<study>/<variant>.json` for each variant, staged with the other results: the task's
    headline test metric (test_dice_mean, test_mre_mm_mean, test_auc)."""
    folder = staging.directory(workspace.path(workspace.HEADLINE, study=study.name))
    for variant, row in headline(per_seed, get_task(study.task).evaluator.headline).items():
        write_new(folder / f"{variant}.json", workspace.json_text(row))


def evaluate(name: str) -> dict:
    """Evaluate all of a study's trials (and, where asked, its fold ensembles) on its test split and
    write predictions, CSVs, JSONs and MLflow. The predictions and metrics files are written beside
    the old ones and swapped in together once all are complete (nnmamba.atomic): a failure leaves
    the previous ones as they were."""
    study = resolve_study(load_params().study(name))
    trials = workspace.load_trials(name)
    test_cases = workspace.load_split(name)["test"]
    connect_ray(study.ray)
    jobs = [{**trial, "model_dirs": [trial["model_dir"]]} for trial in trials["trials"]]
    ensembles = fold_ensembles(trials["trials"]) if study.evaluate.ensemble_folds else []
    with staged() as staging:
        predictions = staging.directory(workspace.path(workspace.PREDICTIONS, study=name))
        per_seed, summary = stage_results(staging, study, score_models(jobs, study, test_cases, predictions),
                                          workspace.TEST_PER_CASE, workspace.TEST_SUMMARY)
        _, ensemble_summary = stage_results(
            staging, study, score_models(ensembles, study, test_cases, predictions, suffix="-ensemble",
                                         desc="ensemble"),
            workspace.TEST_ENSEMBLE_PER_CASE, workspace.TEST_ENSEMBLE_SUMMARY)
        stage_headline(staging, study, per_seed)
    log_to_mlflow(study, trials, per_seed, summary, ensemble_summary)
    return summary


def _as_completed(refs: list):
    """Yield object refs as their tasks finish, so progress shows as models complete."""
    while refs:
        done, refs = ray.wait(refs, num_returns=1)
        yield done[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("study", help="key under `studies` in params.yaml")
    try:
        evaluate(parser.parse_args().study)
    except WriteError as error:
        sys.exit(f"evaluate: {error}")


if __name__ == "__main__":
    main()
