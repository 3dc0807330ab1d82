"""The per-worker training loop that Ray Train runs (DDP: gloo on CPU, NCCL on GPU).

Every epoch: fixed-step training on the task's batches, validation sharded over the workers
(skipped without a validation split), then one `ray.train.report` with a checkpoint from rank 0.
On restart (worker failure, or the stage re-run with the same configuration) the loop resumes
from the latest checkpoint; a fresh trial of a transfer study starts from the upstream study's
model of the same variant and seed (`TrialSpec.init_dir`). A diverging loss fails the trial at
once, naming it, and unretried (`pipelines.failures`).
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
import time
from functools import partial
from pathlib import Path

import psutil
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from torch import nn
from torch.optim.lr_scheduler import LRScheduler

from nnmamba.checkpoint import load_bundle, model_from_arch
from nnmamba.data.preprocessing.preprocess import DATASET_JSON
from nnmamba.engine import (DDP_OPTIONS, CapturedTrainStep, amp_dtype, build_optimizer, build_schedule,
                            WaitTimedBatches, capture_ready_stream, repeat_batches, train_epoch)
from pipelines.failures import TrialDiverged
from pipelines.params import TrialSpec
from pipelines.tasks import Task, get_task
from pipelines.trial import STATE_FILE

# When this worker had imported the training code (MONAI, nnmamba's engine): Ray Train calls
# `pipelines.trial.train_loop`, which imports this module, so a trial's start-up splits into
# launching the worker, Ray Train's setup up to that call, these imports, and the loop's own set-up.
IMPORTED_AT = time.time()


def _controller_launched_at() -> float | None:
    """When this trial's Ray Train controller process started: the newest one on this node started
    before this worker (None where the controller runs on another node)."""
    mine = psutil.Process().create_time()
    starts = [p.info["create_time"] for p in psutil.process_iter(["cmdline", "create_time"])
              if p.info["cmdline"] and p.info["cmdline"][0].startswith("ray::TrainController")
              and p.info["create_time"] <= mine]
    return max(starts, default=None)


def _quiet_report_lines() -> None:
    """Ray Train 2.60 logs every `ray.train.report` at INFO on a logger named after its module's file,
    which RunConfig's LoggingConfig (it filters `ray.train.*` names) does not reach."""
    from ray.train.v2._internal.execution import context

    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _mean_over_workers(value: float, device: torch.device) -> float:
    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    if _distributed():
        dist.all_reduce(tensor)
        tensor /= dist.get_world_size()
    return tensor.item()


def _gather(records: list[dict]) -> list[dict]:
    """Every worker's validation records, on every worker."""
    if not _distributed():
        return records
    gathered: list[list[dict]] = [[] for _ in range(dist.get_world_size())]
    dist.all_gather_object(gathered, records)
    return [record for part in gathered for record in part]


def _restore(model: nn.Module, optimizer: torch.optim.Optimizer, schedule: LRScheduler | None,
             device: torch.device) -> dict | None:
    """The latest Ray Train checkpoint's state (model, optimizer and schedule loaded), or None on a fresh start."""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as directory:
        state = torch.load(Path(directory) / STATE_FILE, map_location=device, weights_only=True)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    if schedule is not None:
        schedule.load_state_dict(state["schedule"])
    return state


def _broadcast_buffers(model: nn.Module) -> None:
    """Give every worker rank 0's buffers (BatchNorm statistics), the ones its checkpoint saves."""
    if _distributed():
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)


def _initialise(model: nn.Module, trial: TrialSpec) -> None:
    """Start from another study's trained model of the same variant and seed (transfer learning)."""
    source, arch = load_bundle(Path(trial.init_dir))
    if arch != trial.arch:
        raise ValueError(f"cannot initialise {trial.run_name} from {trial.init_dir}: its architecture "
                         f"{arch} differs from this study's {trial.arch}")
    model.load_state_dict(source.state_dict())


def _validate(task: Task, model: nn.Module, trial: TrialSpec, device: torch.device, dtype) -> dict[str, float]:
    """Validation sharded over the workers, on the unwrapped model.

    Each worker sees a different number of cases and sliding windows, so the DDP wrapper, whose
    every forward broadcasts buffers collectively, would leave the workers waiting on each other.
    """
    _broadcast_buffers(model)
    context = ray.train.get_context()
    mine = list(trial.val_cases[context.get_world_rank()::context.get_world_size()])
    records = task.validate(model, Path(trial.dataset_dir), mine, trial.study, device, dtype)
    return task.summarise(_gather(records))


def _describe(trial: TrialSpec) -> str:
    """The trial as an error names it: `study brats2023, nnmamba/mic seed 0` (`, fold 2` in a k-fold study)."""
    row = trial.backbone if trial.variant == trial.backbone else f"{trial.backbone}/{trial.variant}"
    return f"study {trial.study.name}, {row} seed {trial.seed}" + ("" if trial.fold is None else f", fold {trial.fold}")


def _epoch_loss(trial: TrialSpec, epoch: int, run_steps, initial_loss: float | None,
                device: torch.device) -> tuple[float, float]:
    """Train one epoch: (the first step's loss, the epoch's mean loss), both averaged over the workers.

    The trial fails, unretried (pipelines.failures), once its loss diverged: not finite, or an
    epoch's mean above `train.divergence_factor` x the first step's. That step's loss is the
    untrained (or upstream) network's, so the first epoch runs as that step, then the rest; the
    first epoch's mean would not do, as a loss that explodes within it is already in it (lr 1e6:
    4e11 in epoch 1, 1e10 after). Every worker decides alike, on the means.
    """
    steps = trial.study.train.steps_per_epoch
    try:
        if initial_loss is None:
            first = run_steps(1)
            initial_loss = _mean_over_workers(first, device)
            loss = first if steps == 1 else (first + (steps - 1) * run_steps(steps - 1)) / steps
        else:
            loss = run_steps(steps)
    except FloatingPointError as error:  # the engine's non-finite step loss, on this worker
        raise TrialDiverged(f"{_describe(trial)}: training diverged at epoch {epoch}: {error}") from error
    loss = _mean_over_workers(loss, device)
    factor = trial.study.train.divergence_factor
    if not math.isfinite(loss) or loss > factor * initial_loss:
        raise TrialDiverged(f"{_describe(trial)}: training diverged at epoch {epoch}: mean train loss {loss:.4g} "
                            f"is above {factor:g} x the first step's {initial_loss:.4g} (train.divergence_factor)")
    return initial_loss, loss


def train_loop(config: dict) -> None:
    """Ray Train's `train_loop_per_worker`; `config["trial"]` is the TrialSpec (pipelines/params.py)."""
    entered = time.perf_counter()
    _quiet_report_lines()
    trial: TrialSpec = config["trial"]
    train, task = trial.study.train, get_task(trial.study.task)
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.manual_seed(trial.seed)
    device = ray.train.torch.get_device()
    dtype = amp_dtype(train.amp)

    model = model_from_arch(trial.arch)
    if train.channels_last:
        model = model.to(memory_format=torch.channels_last_3d)
    # The replayed graph holds DDP's NCCL all-reduces too, so any number of GPUs per trial works.
    graphed = train.cuda_graph and device.type == "cuda"
    if device.type == "cuda":
        torch.cuda.set_device(device)  # the CUDA streams made below belong to this worker's GPU
    with capture_ready_stream(device, enabled=graphed):
        model = ray.train.torch.prepare_model(model, parallel_strategy_kwargs=DDP_OPTIONS)
    bare = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    settings = trial.optimizer
    optimizer = build_optimizer(bare, settings.name, settings.lr, settings.weight_decay, settings.momentum,
                                settings.nesterov, capturable=graphed,
                                tensor_lr=graphed and settings.schedule != "constant")
    schedule = build_schedule(optimizer, settings.schedule, train.epochs)
    state = _restore(bare, optimizer, schedule, device)
    if state is None and trial.init_dir:
        _initialise(bare, trial)
    start_epoch = state["epoch"] if state else 0
    val_metrics = state["val_metrics"] if state else {}
    best = state["best"] if state else None
    initial_loss = state.get("initial_loss") if state else None

    dataset_dir = Path(trial.dataset_dir)
    index = json.loads((dataset_dir / DATASET_JSON).read_text())
    loader = task.train_loader(trial.study, dataset_dir, index, list(trial.train_cases),
                               seed=trial.seed * 1_000 + start_epoch, rank=rank, world_size=world,
                               pin_memory=device.type == "cuda")
    batches = WaitTimedBatches(repeat_batches(loader))
    loss_fn = task.loss(train, trial.loss)
    captured = CapturedTrainStep(model, loss_fn, optimizer, dtype) if graphed else None
    metric, mode = task.selection(bool(trial.val_cases))
    better = max if mode == "max" else min
    run_steps = partial(train_epoch, model, batches, loss_fn, optimizer, device=device, dtype=dtype,
                        channels_last=train.channels_last, captured_step=captured)
    # Where a trial's time goes: worker start-up (first epoch after each start only: wall-clock from
    # the trial's start to Ray Train's controller process, to this worker's process, to its imports
    # done, to this loop, and to the first batch on hand, when the first step starts), the train
    # steps and the part of them spent waiting for the loader, the validation, the whole epoch.
    trial_started_at = config["trial_started_at"]
    controller_at = _controller_launched_at()
    timing = {"setup_time_s": time.perf_counter() - entered,
              **({"controller_launch_s": controller_at - trial_started_at} if controller_at else {}),
              "worker_launch_s": psutil.Process().create_time() - trial_started_at,
              "worker_imported_s": IMPORTED_AT - trial_started_at,
              "trial_start_to_train_s": time.time() - trial_started_at}
    for epoch in range(start_epoch, train.epochs):
        started = time.perf_counter()
        initial_loss, train_loss = _epoch_loss(trial, epoch + 1, run_steps, initial_loss, device)
        if "setup_time_s" in timing:
            timing["trial_start_to_first_step_s"] = batches.first_at - trial_started_at
        timing["train_time_s"] = time.perf_counter() - started
        timing["loader_wait_s"] = batches.take_waited_s()
        due = not val_metrics or (epoch + 1) % train.val_every == 0 or epoch + 1 == train.epochs
        if trial.val_cases and due:
            val_metrics = _validate(task, bare, trial, device, dtype)
        timing["val_time_s"] = time.perf_counter() - started - timing["train_time_s"]
        metrics = {"epoch": epoch + 1, "train_loss": train_loss, **val_metrics}
        best = metrics[metric] if best is None else better(best, metrics[metric])
        metrics |= {f"best_{metric}": best, "epoch_time_s": time.perf_counter() - started,
                    "lr": float(optimizer.param_groups[0]["lr"]), **timing}
        timing = {}
        if schedule is not None:
            schedule.step()
        with tempfile.TemporaryDirectory() as directory:
            checkpoint = None
            if rank == 0:
                torch.save({"model": bare.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch + 1,
                            "val_metrics": val_metrics, "best": best, "initial_loss": initial_loss,
                            "schedule": schedule.state_dict() if schedule else None}, Path(directory) / STATE_FILE)
                checkpoint = ray.train.Checkpoint.from_directory(directory)
            ray.train.report(metrics, checkpoint=checkpoint)
