"""One trial as Ray runs it: the Tune function trainable and the Ray Train run it launches.

Ray imports this module in every trial's Tune actor and Ray Train controller, so it imports only
what they run (Ray Train, the trial's settings): not MONAI, nnMamba's engine or MLflow, seconds per
process. Only the Ray Train workers need the training code (`train_loop` imports
`pipelines.train_worker` there).
"""

from __future__ import annotations

import time

import ray.train
import ray.tune
from ray.train.torch import TorchTrainer
from ray.tune.integration.ray_train import TuneReportCallback

from pipelines.failures import FailFast
from pipelines.params import TrialSpec
from pipelines.tasks import get_task

STATE_FILE = "state.pt"   # each epoch checkpoint's training state (pipelines.train_worker)


def train_loop(config: dict) -> None:
    """Ray Train's per-worker function: `pipelines.train_worker.train_loop`, imported in the worker."""
    from pipelines.train_worker import train_loop as loop

    loop(config)


def build_trainer(trial: TrialSpec, callbacks: list) -> TorchTrainer:
    """The Ray Train run of one (variant, seed): DDP workers, placement, storage and failure policy from params.

    A run with the same name and storage path restores that run's latest checkpoint. Worker
    crashes are retried up to `ray.max_failures`; a deterministic error is not (`FailFast`).
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
            callbacks=[*callbacks, FailFast()],
            # Ray Train's INFO lines (worker group started, process group set up, each checkpoint
            # and report) repeat per trial and epoch; TrialProgress says what they say, once.
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
        ),
    )


def best_of(result: ray.train.Result, trial: TrialSpec) -> dict:
    """What the export reads of a Ray Train run: its best checkpoint by the task's selection metric."""
    metric, mode = get_task(trial.study.task).selection(bool(trial.val_cases))
    better = max if mode == "max" else min
    best_checkpoint, best_metrics = better(result.best_checkpoints, key=lambda pair: pair[1][metric])
    return {"best_checkpoint_path": best_checkpoint.path, f"best_{metric}": best_metrics[metric],
            "best_epoch": best_metrics["epoch"]}


def run_trial(config: dict) -> None:
    """A Tune function trainable: one Ray Train run for one (variant, seed); resumes by run name."""
    trial: TrialSpec = config["trial"]
    ray.tune.report(best_of(build_trainer(trial, [TuneReportCallback()]).fit(), trial))
