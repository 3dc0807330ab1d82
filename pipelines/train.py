"""DVC stage `train@<study>`: the ablation study, variants x seeds, as a Ray Tune grid.

Each grid point is a `TrialSpec` (pipelines/params.py), assembled in one place (`trial_specs`);
the Tune grid runs over that list, and each Tune trial launches its own Ray Train TorchTrainer
(workers and GPUs from params.yaml) whose workers receive the TrialSpec.
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
import time
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
import ray
import ray.train
import ray.tune
import torch
from ray.train.torch import TorchTrainer
from ray.tune.integration.ray_train import TuneReportCallback

from nnmamba.checkpoint import ARCH_FILE, PREDICTION_FILE, WEIGHTS_FILE, load_bundle, model_from_arch, save_bundle
from nnmamba.backbones import NNMAMBA, get_backbone
from nnmamba.models import available_variants
from pipelines import workspace
from pipelines.cluster import connect_ray
from pipelines.params import StudySpec, TrialSpec, load_params
from pipelines.resolve import resolve_study
from pipelines.tasks import get_task
from pipelines.tracking import StudyRuns, experiment_name, flatten, git_commit
from pipelines.train_worker import STATE_FILE, train_loop

SCRATCH_INIT = "nnmamba/models.py"


def config_hash(config: Any) -> str:
    """A short stable digest, used to tell one training configuration's runs from another's."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:10]


def init_models(study: StudySpec) -> Path | None:
    """The models folder a transfer study starts from, or None for a study trained from scratch."""
    if study.init == SCRATCH_INIT:
        return None
    path = workspace.resolve(study.init)
    trials = Path(workspace.TRIALS).name
    if not (path / trials).is_file():
        raise ValueError(f"study {study.name}: init {study.init!r} is neither {SCRATCH_INIT!r} (train from "
                         f"scratch) nor a models/<study> folder written by train@<study> (no {trials} in {path})")
    return path


def init_fingerprint(study: StudySpec) -> str | None:
    """Digest of the upstream weights a transfer study starts from (None from scratch).

    Part of the configuration digest, so retrained upstream models give new trial runs instead of
    resuming the old ones. Fails early, naming the trial, if the upstream study lacks a (variant, seed).
    """
    upstream = init_models(study)
    if upstream is None:
        return None
    digest = hashlib.sha256()
    for _, variant in study.train.grid():
        for seed in study.train.seeds:
            weights = upstream / workspace.trial_name(variant, seed) / WEIGHTS_FILE
            if not weights.is_file():
                raise ValueError(f"study {study.name}: no upstream model for {variant} seed {seed} "
                                 f"({weights} is missing); train the same models and seeds in {upstream.name}")
            digest.update(weights.read_bytes())
    return digest.hexdigest()[:10]


def study_digest(study: StudySpec) -> str:
    """The digest of everything a trial's result depends on but its (variant, seed).

    A new plan (spacing, normalisation) or new upstream weights must not resume old trials.
    """
    identity = {**study.identity(), "plan": workspace.load_plan(study.name),
                "init": {"from": study.init, "weights": init_fingerprint(study)}}
    return config_hash(identity)


def prediction_record(study: StudySpec, index: dict) -> dict | None:
    """What `nnmamba predict` needs besides the weights (saved in every bundle); None for unplanned studies."""
    plan = workspace.load_plan(study.name)
    if plan is None:
        return None
    return {"task": study.task, "channels": index["channels"], "labels": index["labels"], "plan": plan,
            "patch_size": list(study.train.patch_size), "overlap": study.evaluate.overlap}


def backbone_kwargs(study: StudySpec, backbone: str) -> dict:
    """A competitor's constructor options: params.yaml's, plus the plan's spacing for one built from it (nnU-Net)."""
    options = dict(study.train.backbone_options.get(backbone, {}))
    if get_backbone(study.task, backbone).needs_spacing:
        plan = workspace.load_plan(study.name)
        if plan is None:
            raise ValueError(f"study {study.name}: backbone {backbone} is built from the plan's spacing, and the study "
                             "has no plan (only segmentation studies are planned)")
        options.setdefault("spacing", plan["target_spacing"])
    return options


def architecture(study: StudySpec, index: dict, backbone: str, variant: str) -> dict:
    """The bundle's architecture record of one grid row (nnmamba.checkpoint builds the network from it)."""
    nnmamba = backbone == NNMAMBA
    return {
        "task": study.task,
        "backbone": backbone,
        "variant": variant if nnmamba else None,
        "in_channels": len(index["channels"]),
        # One output channel per label (segmentation, classification) or per landmark heatmap.
        "out_channels": len(index["labels"] if "labels" in index else index["landmarks"]),
        "input_shape": list(get_task(study.task).input_shape(study)),
        "kwargs": study.model.kwargs() if nnmamba else backbone_kwargs(study, backbone),
    }


def fold_cases(split: dict) -> dict[int | None, tuple[list[str], list[str]]]:
    """(train, val) case ids per fold: fold k validates on the k-th fold and trains on the others;
    a split without folds is one entry, None."""
    if "folds" not in split:
        return {None: (split["train"], split["val"])}
    return {k: (sorted(set(split["train"]) - set(fold)), fold) for k, fold in enumerate(split["folds"])}


def trial_specs(study: StudySpec, digest: str, storage_path: str) -> list[TrialSpec]:
    """Every (backbone, variant, seed, fold) of the study's grid, made runnable: the one place a trial is assembled."""
    index, split = workspace.load_index(study.name), workspace.load_split(study.name)
    upstream = init_models(study)
    return [
        TrialSpec(study=study, backbone=backbone, variant=variant, seed=seed, fold=fold, digest=digest,
                  optimizer=study.train.optimizer_for(study.task, backbone),
                  storage_path=storage_path, dataset_dir=str(workspace.path(workspace.PREPROCESSED, study=study.name)),
                  train_cases=train, val_cases=val,
                  init_dir=str(upstream / workspace.trial_name(variant, seed, fold)) if upstream else None,
                  arch=architecture(study, index, backbone, variant), prediction=prediction_record(study, index))
        for backbone, variant in study.train.grid() for seed in study.train.seeds
        for fold, (train, val) in fold_cases(split).items()
    ]


def build_trainer(trial: TrialSpec, callbacks: list) -> TorchTrainer:
    """The Ray Train run of one (variant, seed): DDP workers, placement, storage and failure policy from params.

    A run with the same name and storage path restores that run's latest checkpoint.
    """
    ray_spec = trial.study.ray
    metric, mode = get_task(trial.study.task).selection(bool(trial.val_cases))
    return TorchTrainer(
        train_loop,
        train_loop_config={"trial": trial, "trial_started_at": time.time()},
        scaling_config=ray.train.ScalingConfig(
            num_workers=ray_spec.num_workers,
            use_gpu=ray_spec.use_gpu,
            resources_per_worker=dict(ray_spec.resources_per_worker),
            placement_strategy=ray_spec.placement_strategy,
        ),
        run_config=ray.train.RunConfig(
            name=trial.run_name,
            storage_path=trial.storage_path,
            failure_config=ray.train.FailureConfig(max_failures=ray_spec.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=1, checkpoint_score_attribute=metric, checkpoint_score_order=mode
            ),
            callbacks=callbacks,
        ),
    )


def run_trial(config: dict) -> None:
    """A Tune function trainable: one Ray Train run for one (variant, seed); resumes by run name."""
    trial: TrialSpec = config["trial"]
    metric, mode = get_task(trial.study.task).selection(bool(trial.val_cases))
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

    LOGGED = ("epoch", "train_loss", "epoch_time_s", "train_time_s", "loader_wait_s", "val_time_s", "setup_time_s",
              "trial_start_to_train_s", "lr")

    def __init__(self, runs: StudyRuns, parent_id: str, params: dict[str, str]):
        self.runs, self.parent_id, self.params = runs, parent_id, params
        self.run_ids: dict[str, str] = {}
        self.log_seconds: list[float] = []   # the driver's MLflow time per reported epoch

    def on_trial_start(self, iteration, trials, trial, **info):
        spec: TrialSpec = trial.config["trial"]
        params = {**self.params, **flatten({"optimizer": spec.optimizer.model_dump()})}
        self.run_ids[trial.trial_id] = self.runs.child(self.parent_id, spec.backbone, spec.variant, spec.seed,
                                                       spec.fold, params)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        metrics = {k: v for k, v in result.items()
                   if (k in self.LOGGED or k.startswith(("val_", "best_val_"))) and isinstance(v, (int, float))}
        if "epoch" in metrics:
            started = time.perf_counter()
            self.runs.log_metrics(self.run_ids[trial.trial_id], metrics, step=int(metrics["epoch"]))
            self.log_seconds.append(time.perf_counter() - started)

    def on_trial_error(self, iteration, trials, trial, **info):
        self.runs.client.set_terminated(self.run_ids[trial.trial_id], "FAILED")


def export_trial(result, trial: TrialSpec, out_dir: Path, run_id: str, register_as: str | None) -> dict:
    """Copy the trial's best weights to `out_dir`, log them as an MLflow PyTorch model, return a summary row."""
    checkpoint = ray.train.Checkpoint(result.metrics["best_checkpoint_path"])
    with checkpoint.as_directory() as directory:
        state = torch.load(Path(directory) / STATE_FILE, map_location="cpu", weights_only=True)
    save_bundle(out_dir, trial.arch, state["model"], trial.prediction)
    model, arch = load_bundle(out_dir)
    task = get_task(trial.study.task)
    example = torch.zeros(1, arch["in_channels"], *task.input_shape(trial.study)).numpy()
    # The bundle's JSON files travel with the MLflow model, so `nnmamba predict --model models:/...` works.
    extra_files = [str(out_dir / name) for name in (ARCH_FILE, PREDICTION_FILE) if (out_dir / name).is_file()]
    with mlflow.start_run(run_id=run_id, nested=True):
        mlflow.pytorch.log_model(model, name="model", input_example=example, registered_model_name=register_as,
                                 serialization_format="pickle", extra_files=extra_files)
    metric, _ = task.selection(bool(trial.val_cases))
    return {"backbone": trial.backbone, "variant": trial.variant, "seed": trial.seed, "fold": trial.fold,
            "run_id": run_id, "model_dir": str(out_dir),
            f"best_{metric}": result.metrics[f"best_{metric}"], "best_epoch": result.metrics["best_epoch"]}


def check_grid(study: StudySpec) -> None:
    """Stop before Ray starts when a variant is unknown or a backbone cannot take the study's input shape."""
    unknown = [v for v in study.train.variants if v not in available_variants(study.task)]
    if unknown and NNMAMBA in study.train.backbones:
        raise ValueError(f"study {study.name}: variants {unknown} are not {study.task} variants "
                         f"(known: {list(available_variants(study.task))}); set studies.{study.name}.train.variants")
    for backbone in study.train.backbones:
        if backbone != NNMAMBA:
            get_backbone(study.task, backbone).check_input(get_task(study.task).input_shape(study))


def build_each_row(trials: list[TrialSpec]) -> None:
    """Build every row's network once on the CPU, so its constructor's own checks (nnU-Net's topology,
    VNet's channels) stop the stage before Ray starts."""
    for arch in {json.dumps(trial.arch, sort_keys=True): trial.arch for trial in trials}.values():
        model_from_arch(arch)


def train(name: str) -> list[dict]:
    """Run the study's ablation grid and export its models; returns one summary row per trial."""
    study = resolve_study(load_params().study(name))
    check_grid(study)
    digest = study_digest(study)
    storage = study.ray.storage_path
    storage = storage if "://" in storage else str(workspace.resolve(storage))
    trials = trial_specs(study, digest, storage)
    build_each_row(trials)
    runs = StudyRuns(study, digest)
    params = {**flatten({"train": study.train.model_dump(mode="json", exclude_none=True),
                         "model": study.model.kwargs()}), "git_commit": git_commit()}
    parent_id = runs.parent(params)
    try:
        rows = train_grid(study, trials, runs, parent_id, params)
    except BaseException as error:
        runs.end(parent_id, error)
        raise
    runs.end(parent_id)
    return rows


def train_grid(study: StudySpec, trials: list[TrialSpec], runs: StudyRuns, parent_id: str, params: dict) -> list[dict]:
    """The Tune grid of the study's trials, then each trial's export; a child run is FINISHED once
    its model is exported and logged."""
    name, digest, storage = study.name, trials[0].digest, trials[0].storage_path
    connect_ray(study.ray)

    mlflow_callback = MLflowTrialCallback(runs, parent_id, params)
    tuner = ray.tune.Tuner(
        ray.tune.with_resources(run_trial, {"cpu": 0, "memory": 1e6}),
        param_space={"trial": ray.tune.grid_search(trials)},
        tune_config=ray.tune.TuneConfig(max_concurrent_trials=study.ray.max_concurrent_trials,
                                        reuse_actors=study.ray.reuse_actors),
        run_config=ray.tune.RunConfig(
            name=f"{name}-{digest}-tune",
            storage_path=storage,
            callbacks=[mlflow_callback],
            verbose=1,
        ),
    )
    results = tuner.fit()
    if logged := mlflow_callback.log_seconds:
        print(f"train: MLflow logging took {1e3 * sum(logged) / len(logged):.1f} ms per epoch (mean of {len(logged)})")
    errors = [r.error for r in results if r.error]
    if errors:
        raise RuntimeError(f"{len(errors)} of {len(results)} trials failed; first error: {errors[0]}")

    models_dir = workspace.path(workspace.MODELS, study=name)
    shutil.rmtree(models_dir, ignore_errors=True)
    children = runs.children(parent_id)
    register = study.mlflow.register_models
    rows = []
    for result in sorted(results, key=lambda r: r.config["trial"].name):
        trial: TrialSpec = result.config["trial"]
        # Registered as `<experiment>-<backbone>[-<variant>]`: nnmamba-seg-brats2023-nnmamba-miccss, ...-segresnet.
        registered = f"{experiment_name(study)}-{trial.backbone}" if register else None
        if registered and trial.backbone == NNMAMBA:
            registered += f"-{trial.variant}"
        rows.append(export_trial(result, trial, models_dir / trial.name, children[trial.name], registered))
        runs.end(children[trial.name])
    workspace.write_json(workspace.path(workspace.TRIALS, study=name),
                         {"parent_run_id": parent_id, "config_hash": digest, "trials": rows})
    write_curves(runs, rows, get_task(study.task).selection_metric,
                 workspace.path(workspace.TRAIN_CURVES, study=name))
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
        frame.insert(0, "trial", workspace.trial_name(row["variant"], row["seed"], row["fold"]))
        frames.append(frame)
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.concat(frames).to_csv(path, index=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("study", help="key under `studies` in params.yaml")
    train(parser.parse_args().study)


if __name__ == "__main__":
    main()
