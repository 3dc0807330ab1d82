"""DVC stage `train@<study>`: the ablation study, variants x seeds, as a Ray Tune grid.

Each grid point is a `TrialSpec` (pipelines/params.py), assembled in one place (`trial_specs`);
the Tune grid runs over that list, and each Tune trial launches its own Ray Train TorchTrainer
(workers and GPUs from params.yaml) whose workers receive the TrialSpec.
Metrics flow worker -> Tune -> this driver, which alone writes MLflow (parent run for the
ablation, one child run per trial). Afterwards the best checkpoint of every trial (by validation
score) is exported to `models/<study>/<variant>-seed<seed>/` and logged as an MLflow model.

A trial whose Ray Train run has checkpointed its last epoch is not trained again: a re-run reads it
back from the run's storage and, when nothing is left to train, never starts Ray. One whose loss
diverges, or that meets bad settings or data, fails at once, unretried (`pipelines.failures`);
the stage's error names every failed trial with its cause.

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
import logging
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
import ray
import ray.train
import ray.tune
import torch
from mlflow.entities.model_registry import ModelVersion

from nnmamba.atomic import WriteError, staged, write_new
from nnmamba.checkpoint import ARCH_FILE, PREDICTION_FILE, WEIGHTS_FILE, load_bundle, model_from_arch, save_bundle
from nnmamba.backbones import NNMAMBA, get_backbone
from nnmamba.models import available_variants
from pipelines import registry, workspace
from pipelines.cluster import connect_ray
from pipelines.failures import cause_line
from pipelines.model_logging import log_network
from pipelines.params import StudySpec, TrialSpec, load_params
from pipelines.progress import TrialProgress, grid_point
from pipelines.resolve import resolve_study
from pipelines.tasks import get_task
from pipelines.tracking import StudyRuns, experiment_name, flatten, git_commit
from pipelines.trial import STATE_FILE, best_of, run_trial

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
    prediction = get_task(study.task).prediction_record(study, index)   # the same for every trial (reads the plan)
    return [
        TrialSpec(study=study, backbone=backbone, variant=variant, seed=seed, fold=fold, digest=digest,
                  optimizer=study.train.optimizer_for(study.task, backbone),
                  loss=study.train.loss_for(study.task, backbone),
                  storage_path=storage_path, dataset_dir=str(workspace.path(workspace.PREPROCESSED, study=study.name)),
                  train_cases=train, val_cases=val,
                  init_dir=str(upstream / workspace.trial_name(variant, seed, fold)) if upstream else None,
                  arch=architecture(study, index, backbone, variant), prediction=prediction)
        for backbone, variant in study.train.grid() for seed in study.train.seeds
        for fold, (train, val) in fold_cases(split).items()
    ]


def finished_result(trial: TrialSpec) -> ray.train.Result | None:
    """The trial's Ray Train run, read from its storage without Ray, when it checkpointed its last
    epoch; None when it has not (no run yet, or one cut short by a crash or a failure).

    The run's storage is the record of how far a trial got: Ray Train resumes from it, and it
    outlives the stage's own outputs, which DVC deletes before a re-run (`models/<study>`, and
    trials.json in it); its name holds the configuration digest.
    """
    try:
        result = ray.train.Result.from_path(f"{trial.storage_path}/{trial.run_name}")
    except RuntimeError:  # no run folder, or no checkpoint registered in it
        return None
    return result if result.metrics and result.metrics.get("epoch") == trial.study.train.epochs else None


def trial_run(runs: StudyRuns, parent_id: str, params: dict[str, str], trial: TrialSpec) -> str:
    """The trial's MLflow child run, found or created (with its params)."""
    params = {**params, **flatten({"optimizer": trial.optimizer.model_dump()}),
              **({"loss": trial.loss} if trial.loss else {})}
    return runs.child(parent_id, trial.backbone, trial.variant, trial.seed, trial.fold, params)


def tune_result(trial: TrialSpec, result: ray.train.Result) -> ray.tune.Result:
    """A trial trained by an earlier run of the stage, as the Tune result of it that the export reads."""
    return ray.tune.Result(metrics={**best_of(result, trial), "config": {"trial": trial}},
                           checkpoint=result.checkpoint, error=None, path=result.path)


def tune_grid(study: StudySpec, trials: list[TrialSpec], runs: StudyRuns, parent_id: str,
              params: dict) -> list[ray.tune.Result]:
    """The Tune grid of these trials, one Ray Train run each; Ray starts only when there is one."""
    if not trials:
        return []
    connect_ray(study.ray)
    mlflow_callback = MLflowTrialCallback(runs, parent_id, params)
    tuner = ray.tune.Tuner(
        ray.tune.with_resources(run_trial, {"cpu": 0, "memory": 1e6}),
        param_space={"trial": ray.tune.grid_search(trials)},
        tune_config=ray.tune.TuneConfig(max_concurrent_trials=study.ray.max_concurrent_trials,
                                        reuse_actors=study.ray.reuse_actors),
        run_config=ray.tune.RunConfig(
            name=f"{study.name}-{trials[0].digest}-tune",
            storage_path=trials[0].storage_path,
            callbacks=[mlflow_callback, TrialProgress()],
            verbose=0,   # TrialProgress prints a line per trial event instead of Tune's status tables
        ),
    )
    logging.getLogger("ray.tune.logger.tensorboardx").setLevel(logging.WARNING)   # a line per trial: hparams dropped
    results = list(tuner.fit())
    if logged := mlflow_callback.log_seconds:
        print(f"train: MLflow logging took {1e3 * sum(logged) / len(logged):.1f} ms per epoch (mean of {len(logged)})")
    return results


def failure_report(study: StudySpec, failed: list[ray.tune.Result], total: int) -> str:
    """The stage's error: a line per failed trial, (variant, seed[, fold]) and its cause in one line."""
    failed = sorted(failed, key=lambda r: r.config["trial"].name)
    names = [grid_point(result.config["trial"]) for result in failed]
    # The first line names them all: the parent run's `failure` tag keeps the first line only.
    lines = [f"study {study.name}: {len(failed)} of {total} trials failed: {', '.join(names)}"]
    lines += [f"  {name}: {cause_line(result.error)}" for name, result in zip(names, failed)]
    return "\n".join(lines)


class MLflowTrialCallback(ray.tune.Callback):
    """Mirror each Tune trial into its MLflow child run, from the driver only.

    Ray's MLflowLoggerCallback creates a new run per trial start and takes one tag set for all
    trials; we need per-trial tags (variant, seed) and a run that is continued, not duplicated,
    when a trial or the whole stage restarts, hence this small callback.
    """

    LOGGED = ("epoch", "train_loss", "epoch_time_s", "train_time_s", "loader_wait_s", "val_time_s", "setup_time_s",
              "controller_launch_s", "worker_launch_s", "worker_imported_s", "trial_start_to_train_s", "trial_start_to_first_step_s", "lr")

    def __init__(self, runs: StudyRuns, parent_id: str, params: dict[str, str]):
        self.runs, self.parent_id, self.params = runs, parent_id, params
        self.run_ids: dict[str, str] = {}
        self.log_seconds: list[float] = []   # the driver's MLflow time per reported epoch

    def on_trial_start(self, iteration, trials, trial, **info):
        self.run_ids[trial.trial_id] = trial_run(self.runs, self.parent_id, self.params, trial.config["trial"])

    def on_trial_result(self, iteration, trials, trial, result, **info):
        metrics = {k: v for k, v in result.items()
                   if (k in self.LOGGED or k.startswith(("val_", "best_val_"))) and isinstance(v, (int, float))}
        if "epoch" in metrics:
            started = time.perf_counter()
            self.runs.log_metrics(self.run_ids[trial.trial_id], metrics, step=int(metrics["epoch"]))
            self.log_seconds.append(time.perf_counter() - started)

    def on_trial_error(self, iteration, trials, trial, **info):
        self.runs.client.set_terminated(self.run_ids[trial.trial_id], "FAILED")


# A child run's tag: the checkpoint whose weights its logged MLflow model holds.
EXPORTED_CHECKPOINT_TAG = "exported_checkpoint"


def export_trial(result, trial: TrialSpec, partial: Path, models_dir: Path, runs: StudyRuns, run_id: str,
                 register_as: str | None) -> dict:
    """Write the trial's best weights as a bundle in `partial` (the study's models folder being written,
    swapped in as `models_dir`), log them as an MLflow PyTorch model, return a summary row.

    A run that already logged (and, where asked, registered) this checkpoint's model (a re-run of a
    finished stage) is not logged again: that would take seconds per model and add a registered
    version holding the same weights.
    """
    best_path = result.metrics["best_checkpoint_path"]
    checkpoint = ray.train.Checkpoint(best_path)
    with checkpoint.as_directory() as directory:
        state = torch.load(Path(directory) / STATE_FILE, map_location="cpu", weights_only=True)
    bundle = partial / trial.name
    save_bundle(bundle, trial.arch, state["model"], trial.prediction)
    model, arch = load_bundle(bundle)
    task = get_task(trial.study.task)
    # The bundle's JSON files travel with the MLflow model, so `nnmamba predict --model models:/...` works.
    extra_files = [str(bundle / name) for name in (ARCH_FILE, PREDICTION_FILE) if (bundle / name).is_file()]
    logged = runs.client.get_run(run_id).data.tags.get(EXPORTED_CHECKPOINT_TAG) == best_path
    if not logged or (register_as and registry.latest_version(runs.client, register_as, run_id) is None):
        with mlflow.start_run(run_id=run_id, nested=True):
            log_network(model, arch, task.input_shape(trial.study), dense=task.name != "classification",
                        registered_name=register_as, extra_files=extra_files)
        runs.client.set_tag(run_id, EXPORTED_CHECKPOINT_TAG, best_path)
    metric, _ = task.selection(bool(trial.val_cases))
    return {"backbone": trial.backbone, "variant": trial.variant, "seed": trial.seed, "fold": trial.fold,
            "run_id": run_id, "model_dir": str(models_dir / trial.name),
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
    """The trials not trained yet through the Tune grid (each resuming from its last checkpoint),
    those trained by an earlier run read back without starting Ray; then every trial's export. A
    child run is FINISHED once its model is exported and logged."""
    trained = {trial.name: result for trial in trials if (result := finished_result(trial))}
    if trained:
        print(f"train: {len(trained)} of {len(trials)} trials were trained before, read from their Ray Train "
              f"runs: {', '.join(sorted(trained))}", flush=True)
    results = []
    for trial in (trial for trial in trials if trial.name in trained):
        trial_run(runs, parent_id, params, trial)  # its MLflow child run: found, or made anew for a store that lost it
        results.append(tune_result(trial, trained[trial.name]))
    results += tune_grid(study, [trial for trial in trials if trial.name not in trained], runs, parent_id, params)
    if failed := [result for result in results if result.error]:
        raise RuntimeError(failure_report(study, failed, len(results)))

    return export_models(study, results, runs, parent_id)


def export_models(study: StudySpec, results: Iterable[ray.tune.Result], runs: StudyRuns, parent_id: str) -> list[dict]:
    """Every trial's bundle, trials.json and the training curves, swapped in together once all are
    written (nnmamba.atomic): a failure (a full disk) leaves the previous export and curves as they
    were. Child runs end FINISHED only after the swap, else FAILED with the error."""
    models_dir = workspace.path(workspace.MODELS, study=study.name)
    children = runs.children(parent_id)
    finished = sorted(results, key=lambda r: r.config["trial"].name)
    trial_runs = [children[result.config["trial"].name] for result in finished]
    try:
        with staged() as staging:
            partial = staging.directory(models_dir)
            rows = [export_trial(result, result.config["trial"], partial, models_dir, runs, run_id,
                                 registered_name(study, result.config["trial"]))
                    for result, run_id in zip(finished, trial_runs)]
            write_new(partial / Path(workspace.TRIALS).name, workspace.json_text(
                {"parent_run_id": parent_id, "config_hash": finished[0].config["trial"].digest, "trials": rows}))
            staging.file(workspace.path(workspace.TRAIN_CURVES, study=study.name),
                         training_curves(runs, rows, get_task(study.task).selection_metric))
    except BaseException as error:
        for run_id in trial_runs:
            runs.end(run_id, error)
        raise
    for run_id in trial_runs:
        runs.end(run_id)
    describe_versions(study, finished, rows, runs)
    return rows


def describe_versions(study: StudySpec, finished: list[ray.tune.Result], rows: list[dict], runs: StudyRuns) -> None:
    """Tag and describe each exported trial's registered version (pipelines.registry) and move each
    registered model's `best` alias to its best validation score, once the export is in place."""
    trials: list[TrialSpec] = [result.config["trial"] for result in finished]
    metric, mode = get_task(study.task).selection(bool(trials[0].val_cases))   # one split for all trials
    scored = [(describe_version(study, trial, row, runs, name, metric), row[f"best_{metric}"])
              for trial, row in zip(trials, rows) if (name := registered_name(study, trial))]
    registry.set_best(runs.client, scored, mode)


def describe_version(study: StudySpec, trial: TrialSpec, row: dict, runs: StudyRuns, name: str,
                     metric: str) -> ModelVersion:
    """The trial's registered version, tagged with its grid point, how it was selected and the commit
    its run was made at (the run's `git_commit` param, else the current one), and described."""
    score, epoch = row[f"best_{metric}"], row["best_epoch"]
    commit = runs.client.get_run(row["run_id"]).data.params.get("git_commit") or git_commit()
    tags = {"study": study.name, "backbone": trial.backbone, "variant": trial.variant, "seed": str(trial.seed),
            **({} if trial.fold is None else {"fold": str(trial.fold)}),
            "selection_metric": metric, "selection_value": f"{score:.6g}", "best_epoch": str(epoch),
            "git_commit": commit, "config_hash": trial.digest}
    version = registry.latest_version(runs.client, name, row["run_id"])
    registry.describe(runs.client, version, tags, f"{study.name} {trial.name} ({trial.backbone}): best {metric} "
                                                  f"{score:.4g} at epoch {epoch}; commit {commit}, "
                                                  f"configuration {trial.digest}")
    return version


def registered_name(study: StudySpec, trial: TrialSpec) -> str | None:
    """`<experiment>-<backbone>[-<variant>]` (nnmamba-seg-brats2023-nnmamba-miccss, ...-segresnet), or None
    when the study registers no models."""
    if not study.mlflow.register_models:
        return None
    name = f"{experiment_name(study)}-{trial.backbone}"
    return f"{name}-{trial.variant}" if trial.backbone == NNMAMBA else name


def training_curves(runs: StudyRuns, rows: list[dict], metric: str) -> str:
    """Per-epoch training curves of every trial as CSV, read back from MLflow so restarts keep their history.

    Long format, one row per (trial, epoch), its `variant` and `seed` beside: dvc.yaml's template
    (pipelines/plots/trial_curves.json) draws one line per trial, coloured by variant, dashed by seed.
    The selection metric stays the last column, the y that DVC plots by default."""
    frames = []
    for row in rows:
        history = {
            key: {m.step: m.value for m in runs.client.get_metric_history(row["run_id"], key)}
            for key in ("train_loss", metric)
        }
        frame = pd.DataFrame(history).rename_axis("epoch").reset_index()
        trial = {"trial": workspace.trial_name(row["variant"], row["seed"], row["fold"]),
                 "variant": row["variant"], "seed": row["seed"]}
        frames.append(frame.assign(**trial)[[*trial, *frame.columns]])
    return pd.concat(frames).to_csv(index=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("study", help="key under `studies` in params.yaml")
    try:
        train(parser.parse_args().study)
    except WriteError as error:
        sys.exit(f"train: {error}")


if __name__ == "__main__":
    main()
