"""DVC stage `train@<study>`: the ablation study, variants x seeds, as a Ray Tune grid.

Each Tune trial launches its own Ray Train TorchTrainer (workers and GPUs from params.yaml).
Metrics flow worker -> Tune -> this driver, which alone writes MLflow (parent run for the
ablation, one child run per trial). Afterwards the best checkpoint of every trial (by validation
score) is exported to `models/<study>/<variant>-seed<seed>/` and logged as an MLflow model.

A study whose `init` names another study's models (`init: models/adni_ad`) is a transfer study:
each trial starts from that study's model of the same variant and seed (the paper's Table 3
setting); `init: nnmamba/models.py` starts from freshly built weights. dvc.yaml lists `init` as a
dependency of train@<study>, which puts the chain in DVC's graph.

Local Ray by default; `RAY_ADDRESS` (or `ray.address` in params.yaml) selects a cluster, and
`ray.preset` the scale (ray_configs/presets/). On a cluster, submit it as a Ray job
(README, "Running on a cluster"):

    python -m pipelines.train brats2023
    ray job submit ... --working-dir . -- NNMAMBA_WORKSPACE=$PWD python -m pipelines.train brats2023
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
from pathlib import Path

import mlflow
import pandas as pd
import ray
import ray.train
import ray.tune
import torch
from ray.train.torch import TorchTrainer
from ray.tune.integration.ray_train import TuneReportCallback

from nnmamba.checkpoint import ARCH_FILE, PREDICTION_FILE, WEIGHTS_FILE, load_bundle, save_bundle
from nnmamba.models import available_variants
from nnmamba.tasks import get_task
from pipelines.cluster import connect_ray
from pipelines.config import (
    WORKSPACE_ENV, config_hash, git_commit, resolve_path, study_config, workspace_root, write_json,
)
from pipelines.prepare import PREPROCESSED_ROOT
from pipelines.resolve import load_plan, resolve_study
from pipelines.split import SPLITS_ROOT
from pipelines.tracking import StudyRuns, experiment_name, flatten
from pipelines.train_worker import STATE_FILE, selection, train_loop

MODELS_ROOT = "models"
METRICS_ROOT = "metrics"
SCRATCH_INIT = "nnmamba/models.py"
TRIALS_FILE = "trials.json"


def trial_dir_name(variant: str, seed: int) -> str:
    return f"{variant}-seed{seed}"


def load_trials(study: str) -> dict:
    """What train@<study> recorded: its MLflow parent run, config digest and one row per exported trial."""
    return json.loads((resolve_path(MODELS_ROOT) / study / TRIALS_FILE).read_text())


def init_models(config: dict) -> Path | None:
    """The models folder a transfer study starts from, or None for a study trained from scratch."""
    if config["init"] == SCRATCH_INIT:
        return None
    path = resolve_path(config["init"])
    if not (path / TRIALS_FILE).is_file():
        raise ValueError(f"study {config['study']}: init {config['init']!r} is neither {SCRATCH_INIT!r} (train from "
                         f"scratch) nor a models/<study> folder written by train@<study> (no {TRIALS_FILE} in {path})")
    return path


def init_fingerprint(config: dict) -> str | None:
    """Digest of the upstream weights a transfer study starts from (None from scratch).

    Part of the configuration digest, so retrained upstream models give new trial runs instead of
    resuming the old ones. Fails early, naming the trial, if the upstream study lacks a (variant, seed).
    """
    upstream = init_models(config)
    if upstream is None:
        return None
    digest = hashlib.sha256()
    for variant in config["train"]["variants"]:
        for seed in config["train"]["seeds"]:
            weights = upstream / trial_dir_name(variant, seed) / WEIGHTS_FILE
            if not weights.is_file():
                raise ValueError(f"study {config['study']}: no upstream model for {variant} seed {seed} "
                                 f"({weights} is missing); train the same variants and seeds in {upstream.name}")
            digest.update(weights.read_bytes())
    return digest.hexdigest()[:10]


def trial_plan(config: dict) -> dict:
    """Everything a trial needs that does not depend on (variant, seed): paths, split, architecture."""
    study = config["study"]
    dataset_dir = resolve_path(PREPROCESSED_ROOT) / study
    split_file = resolve_path(SPLITS_ROOT) / f"{study}.json"
    for needed in (dataset_dir / "dataset.json", split_file):
        if not needed.is_file():
            raise FileNotFoundError(
                f"{needed}: study {study!r} has no prepared data in workspace {workspace_root()}; run "
                f"`dvc repro split@{study}` there, or set {WORKSPACE_ENV} to the checkout that holds data/"
            )
    index = json.loads((dataset_dir / "dataset.json").read_text())
    split = json.loads(split_file.read_text())
    upstream = init_models(config)
    return {
        "config": config,
        "dataset_dir": str(dataset_dir),
        "train_cases": split["train"],
        "val_cases": split["val"],
        "init_models": str(upstream) if upstream else None,
        "arch": {
            "task": config["task"],
            "in_channels": len(index["channels"]),
            # One output channel per label (segmentation) or per landmark heatmap.
            "out_channels": len(index["labels"] if "labels" in index else index["landmarks"]),
            "kwargs": config["model"],
        },
        "prediction": prediction_record(config, index),
    }


def prediction_record(config: dict, index: dict) -> dict | None:
    """What `nnmamba predict` needs besides the weights (saved in every bundle); None for unplanned studies."""
    plan = load_plan(config["study"])
    if plan is None:
        return None
    return {"task": config["task"], "channels": index["channels"], "labels": index["labels"], "plan": plan,
            "patch_size": config["train"]["patch_size"], "overlap": config["evaluate"]["overlap"]}


def build_trainer(trial: dict, callbacks: list) -> TorchTrainer:
    """The Ray Train run of one (variant, seed): DDP workers, placement, storage and failure policy from params.

    A run with the same name and storage path restores that run's latest checkpoint.
    """
    config = trial["config"]
    ray_cfg, task = config["ray"], get_task(config["task"])
    metric, mode = selection(task, bool(trial["val_cases"]))
    return TorchTrainer(
        train_loop,
        train_loop_config=trial,
        scaling_config=ray.train.ScalingConfig(
            num_workers=ray_cfg["num_workers"],
            use_gpu=ray_cfg["use_gpu"],
            resources_per_worker=ray_cfg["resources_per_worker"],
            placement_strategy=ray_cfg["placement_strategy"],
        ),
        run_config=ray.train.RunConfig(
            name=trial["run_name"],
            storage_path=trial["storage_path"],
            failure_config=ray.train.FailureConfig(max_failures=ray_cfg["max_failures"]),
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=1, checkpoint_score_attribute=metric, checkpoint_score_order=mode
            ),
            callbacks=callbacks,
        ),
    )


def run_trial(trial: dict) -> None:
    """A Tune function trainable: one Ray Train run for one (variant, seed); resumes by run name."""
    metric, mode = selection(get_task(trial["config"]["task"]), bool(trial["val_cases"]))
    result = build_trainer(trial, [TuneReportCallback()]).fit()
    better = max if mode == "max" else min
    best_checkpoint, best_metrics = better(result.best_checkpoints, key=lambda pair: pair[1][metric])
    ray.tune.report({"best_checkpoint_path": best_checkpoint.path, f"best_{metric}": best_metrics[metric],
                     "best_epoch": best_metrics["epoch"]})


class MLflowTrialCallback(ray.tune.Callback):
    """Mirror each Tune trial into its MLflow child run, from the driver only.

    Ray's MLflowLoggerCallback creates a new run per trial start and takes one tag set for all
    trials; we need per-trial tags (variant, seed) and a run that is continued, not duplicated,
    when a trial or the whole stage restarts, hence this small callback.
    """

    LOGGED = ("epoch", "train_loss", "epoch_time_s")

    def __init__(self, runs: StudyRuns, parent_id: str, params: dict[str, str]):
        self.runs, self.parent_id, self.params = runs, parent_id, params
        self.run_ids: dict[str, str] = {}

    def on_trial_start(self, iteration, trials, trial, **info):
        self.run_ids[trial.trial_id] = self.runs.child(
            self.parent_id, trial.config["variant"], trial.config["seed"], self.params
        )

    def on_trial_result(self, iteration, trials, trial, result, **info):
        metrics = {k: v for k, v in result.items()
                   if (k in self.LOGGED or k.startswith(("val_", "best_val_"))) and isinstance(v, (int, float))}
        if "epoch" in metrics:
            self.runs.log_metrics(self.run_ids[trial.trial_id], metrics, step=int(metrics["epoch"]))

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.runs.client.set_terminated(self.run_ids[trial.trial_id], "FINISHED")

    def on_trial_error(self, iteration, trials, trial, **info):
        self.runs.client.set_terminated(self.run_ids[trial.trial_id], "FAILED")


def export_trial(result, plan: dict, out_dir: Path, run_id: str, register_as: str | None) -> dict:
    """Copy the trial's best weights to `out_dir`, log them as an MLflow PyTorch model, return a summary row."""
    checkpoint = ray.train.Checkpoint(result.metrics["best_checkpoint_path"])
    variant, seed = result.config["variant"], result.config["seed"]
    with checkpoint.as_directory() as directory:
        state = torch.load(Path(directory) / STATE_FILE, map_location="cpu", weights_only=True)
    save_bundle(out_dir, {**plan["arch"], "variant": variant}, state["model"], plan["prediction"])
    model, arch = load_bundle(out_dir)
    task = get_task(plan["config"]["task"])
    example = torch.zeros(1, arch["in_channels"], *task.input_shape(plan["config"])).numpy()
    # The bundle's JSON files travel with the MLflow model, so `nnmamba predict --model models:/...` works.
    extra_files = [str(out_dir / name) for name in (ARCH_FILE, PREDICTION_FILE) if (out_dir / name).is_file()]
    with mlflow.start_run(run_id=run_id, nested=True):
        mlflow.pytorch.log_model(model, name="model", input_example=example, registered_model_name=register_as,
                                 serialization_format="pickle", extra_files=extra_files)
    metric, _ = selection(task, bool(plan["val_cases"]))
    return {"variant": variant, "seed": seed, "run_id": run_id, "model_dir": str(out_dir),
            f"best_{metric}": result.metrics[f"best_{metric}"], "best_epoch": result.metrics["best_epoch"]}


def train(study: str) -> list[dict]:
    """Run the study's ablation grid and export its models; returns one summary row per trial."""
    config = resolve_study(study_config(study))
    train_cfg, metric = config["train"], get_task(config["task"]).selection_metric
    unknown = [v for v in train_cfg["variants"] if v not in available_variants(config["task"])]
    if unknown:
        raise ValueError(f"study {study}: variants {unknown} are not {config['task']} variants "
                         f"(known: {list(available_variants(config['task']))}); set studies.{study}.train.variants")
    identity = {k: config[k] for k in ("dataset", "prepare", "split", "model")}
    identity["train"] = {k: v for k, v in train_cfg.items() if k not in ("variants", "seeds")}
    identity["plan"] = load_plan(study)  # a new plan (spacing, normalisation) must not resume old trials
    identity["init"] = {"from": config["init"], "weights": init_fingerprint(config)}
    digest = config_hash(identity)
    plan = trial_plan(config)
    runs = StudyRuns(config, digest)
    params = {**flatten({"train": train_cfg, "model": config["model"]}), "git_commit": git_commit()}
    parent_id = runs.parent(params)
    connect_ray(config)

    storage = config["ray"]["storage_path"]
    storage = storage if "://" in storage else str(resolve_path(storage))
    param_space = {
        **plan,
        "variant": ray.tune.grid_search(train_cfg["variants"]),
        "seed": ray.tune.grid_search(train_cfg["seeds"]),
        "storage_path": storage,
        "digest": digest,
    }
    trainable = ray.tune.with_resources(_trial_entry, {"cpu": 0, "memory": 1e6})
    tuner = ray.tune.Tuner(
        trainable,
        param_space=param_space,
        tune_config=ray.tune.TuneConfig(max_concurrent_trials=config["ray"]["max_concurrent_trials"],
                                        reuse_actors=config["ray"].get("reuse_actors", False)),
        run_config=ray.tune.RunConfig(
            name=f"{study}-{digest}-tune",
            storage_path=storage,
            callbacks=[MLflowTrialCallback(runs, parent_id, params)],
            verbose=1,
        ),
    )
    results = tuner.fit()
    errors = [r.error for r in results if r.error]
    if errors:
        raise RuntimeError(f"{len(errors)} of {len(results)} trials failed; first error: {errors[0]}")

    models_dir = resolve_path(MODELS_ROOT) / study
    shutil.rmtree(models_dir, ignore_errors=True)
    children = runs.children(parent_id)
    register = config["mlflow"]["register_models"]
    rows = []
    for result in sorted(results, key=lambda r: (r.config["variant"], r.config["seed"])):
        variant, seed = result.config["variant"], result.config["seed"]
        # Registered names are `<experiment>-<variant>`, e.g. nnmamba-seg-brats2023-miccss.
        name = f"{experiment_name(config)}-{variant}" if register else None
        rows.append(export_trial(result, plan, models_dir / trial_dir_name(variant, seed),
                                 children[(variant, seed)], name))
    write_json(models_dir / TRIALS_FILE, {"parent_run_id": parent_id, "config_hash": digest, "trials": rows})
    write_curves(runs, rows, metric, resolve_path(METRICS_ROOT) / study / "train_curves.csv")
    return rows


def write_curves(runs: StudyRuns, rows: list[dict], metric: str, path: Path) -> None:
    """Per-epoch training curves of every trial, read back from MLflow so restarts keep their history."""
    frames = []
    for row in rows:
        history = {
            key: {m.step: m.value for m in runs.client.get_metric_history(row["run_id"], key)}
            for key in ("train_loss", metric)
        }
        frame = pd.DataFrame(history).rename_axis("epoch").reset_index()
        frame.insert(0, "trial", trial_dir_name(row["variant"], row["seed"]))
        frames.append(frame)
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.concat(frames).to_csv(path, index=False)


def resolve_trial(trial: dict) -> dict:
    """One grid point made runnable: its Ray Train run named by study, variant, seed and config
    digest (so a re-run resumes it), and the variant put into the architecture record."""
    variant, seed = trial["variant"], trial["seed"]
    run_name = f"{trial['config']['study']}-{variant}-seed{seed}-{trial['digest']}"
    init_dir = str(Path(trial["init_models"]) / trial_dir_name(variant, seed)) if trial["init_models"] else None
    return {**trial, "run_name": run_name, "init_dir": init_dir, "arch": {**trial["arch"], "variant": variant}}


def _trial_entry(trial: dict) -> None:
    run_trial(resolve_trial(trial))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("study", help="key under `studies` in params.yaml")
    train(parser.parse_args().study)


if __name__ == "__main__":
    main()
