"""Ray Train scaling of the segmentation train stage's worker loop on 1, 2, 4 GPUs, with start-up phases timed.

Drives `pipelines.train_worker.train_loop` (the function the `train` stage gives TorchTrainer)
through `ray.train.torch.TorchTrainer` with NCCL, bf16 and channels_last_3d, the paper's network
(B=2 per GPU, 1 x 128^3, 16 classes) and the mamba-ssm kernels. Batches come from memory (a
benchmark task registered here), so what is measured is the training loop, DDP and Ray, not the
disk or augmentation (the loader has its own benchmark). There is no validation set: the task's
validation returns no records and a constant score, so the loop's per-epoch validation is free.

Reported per GPU count: samples/s over the epochs after the first (cuDNN autotuning and NCCL
set-up fall in the first), from the times at which the loop takes each batch (it waits for every
step's loss, so these are step completion times; epoch ends, with validation and checkpointing,
are left out), and each worker's start-up phases:
worker process start -> train function entered -> CUDA context -> kernels imported -> first NCCL
collective -> model built and on the GPU inside `train_loop` (stamped when the loop asks the task
for its loader, right after `prepare_model`).

Each mode runs every GPU count, and efficiency compares a mode's N-GPU samples/s with the same
mode's 1 GPU: "graph" (`train.cuda_graph: true`, the whole DDP step replayed as a CUDA graph, as the
`paper` profile trains) and "eager".

    python benchmarks/ray_train_scaling.py --out benchmarks/results/ray_train_scaling.json --gpus 1 2 4
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
import types
from pathlib import Path

import psutil
import ray
import ray.train
import ray.train.torch
import torch

from _common import ResultFile, seconds_since, stamp_cuda_start, stamp_first_collective
from _synthetic import BATCH, CLASSES, IN_CHANNELS, PATCH, segmentation_batches
from pipelines.cluster import WORKER_ENV
from pipelines.params import TrialSpec, load_params

TASK = "segmentation-in-memory"


class StampedBatches:
    """The same few batches on every pass, with the time each one is taken appended to `times`."""

    def __init__(self, batches: list[dict], times: list[float]):
        self.batches, self.times = batches, times

    def __iter__(self):
        for batch in self.batches:
            self.times.append(time.time())
            yield batch


def _register_in_memory_task(phases: dict[str, float]) -> None:
    """Add TASK to the task registry of this worker process: the segmentation task with in-memory
    batches and no validation data (a module of its own, as the registry imports tasks by module)."""
    from pipelines.tasks import TASK_MODULES, get_task

    def loader(study, dataset_dir, index, case_ids, seed, rank, world_size, pin_memory=False):
        phases["model_on_gpu_in_train_loop"] = time.time()
        batches = segmentation_batches(seed + rank, study.train.batch_size, tuple(study.train.patch_size))
        return StampedBatches(batches, phases.setdefault("batch_times", []))

    module = types.ModuleType(f"benchmark_{TASK.replace('-', '_')}")
    module.TASK = dataclasses.replace(get_task("segmentation"), name=TASK, selection_metric="val_constant",
                                      train_loader=loader, validate=lambda *args: [],
                                      summarise=lambda records: {"val_constant": 0.0})
    sys.modules[module.__name__] = module
    TASK_MODULES[TASK] = module.__name__


def timed_train_loop(config: dict) -> None:
    """train_loop with each start-up phase stamped; stamps go to config['phase_dir'] as one JSON per rank."""
    phases = {"process_start": psutil.Process().create_time(), "train_function_entered": time.time()}
    context = ray.train.get_context()
    device = ray.train.torch.get_device()
    stamp_cuda_start(phases, device)
    stamp_first_collective(phases, device)
    _register_in_memory_task(phases)
    from pipelines.train_worker import train_loop

    phases["train_loop_entered"] = time.time()
    train_loop(config)
    phases["train_loop_done"] = time.time()
    out = Path(config["phase_dir"]) / f"world{context.get_world_size()}_rank{context.get_world_rank()}.json"
    out.write_text(json.dumps({**phases, "env": {k: os.environ.get(k) for k in (
        "CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS", *WORKER_ENV)}}))


def trial_config(dataset_dir: Path, phase_dir: Path, epochs: int, steps: int, smoke: bool, cuda_graph: bool) -> dict:
    """What the train stage gives `train_loop`, a TrialSpec (params.yaml's brats2023 study on the
    benchmark task: the paper's segmentation setting, or a tiny CPU one), plus where phases go."""
    study = load_params().study("brats2023")
    train = {"epochs": epochs, "steps_per_epoch": steps, "batch_size": BATCH, "patch_size": PATCH, "amp": "bf16",
             "channels_last": True, "cuda_graph": cuda_graph, "val_every": 1000}
    model = study.model.model_copy(update={"base_channels": 32, "blocks_per_stage": 3})
    if smoke:
        train.update(patch_size=(32, 32, 32), amp="none", channels_last=False)
        model = study.model.model_copy(update={"base_channels": 4, "blocks_per_stage": 2})
    study = study.model_copy(update={"task": TASK, "train": study.train.model_copy(update=train), "model": model})
    trial = TrialSpec(study=study, backbone="nnmamba", variant="miccss", seed=0, digest="benchmark",
                      optimizer=study.train.optimizer, storage_path="",
                      dataset_dir=str(dataset_dir), train_cases=(), val_cases=(), init_dir=None, prediction=None,
                      arch={"task": "segmentation", "variant": "miccss", "in_channels": IN_CHANNELS,
                            "out_channels": CLASSES, "kwargs": model.kwargs()})
    return {"trial": trial, "phase_dir": str(phase_dir)}


def run(gpus: int, config: dict, storage: Path, use_gpu: bool) -> dict:
    """One TorchTrainer fit on `gpus` workers; samples/s from rank 0's batch timestamps after the first epoch."""
    from ray.train.torch import TorchTrainer

    started = time.time()
    train = config["trial"].study.train
    trainer = TorchTrainer(
        timed_train_loop, train_loop_config=config,
        scaling_config=ray.train.ScalingConfig(num_workers=gpus, use_gpu=use_gpu,
                                               resources_per_worker={"CPU": 2, "GPU": 1} if use_gpu else {"CPU": 1}),
        run_config=ray.train.RunConfig(name=f"scaling-{gpus}gpu-{'graph' if train.cuda_graph else 'eager'}",
                                       storage_path=str(storage),
                                       checkpoint_config=ray.train.CheckpointConfig(num_to_keep=1)),
    )
    trainer.fit()
    finished = time.time()
    phases = [json.loads(p.read_text()) for p in sorted(Path(config["phase_dir"]).glob(f"world{gpus}_rank*.json"))]
    step_seconds = steady_step_seconds(phases[0]["batch_times"], train.steps_per_epoch) if phases else []
    relative = [seconds_since(p, "train_function_entered") for p in phases]
    mean_step = sum(step_seconds) / len(step_seconds) if step_seconds else None
    return {"gpus": gpus, "cuda_graph": train.cuda_graph, "fit_wall_s": finished - started,
            "steady_step_s_per_epoch": step_seconds,
            "samples_per_s": gpus * train.batch_size / mean_step if mean_step else None,
            "worker_phases_s_since_train_function_entered": relative,
            "worker_process_start_s_after_fit_start": [round(p["process_start"] - started, 3) for p in phases],
            "train_function_entered_s_after_fit_start": [round(p["train_function_entered"] - started, 3)
                                                          for p in phases],
            "worker_env": phases[0]["env"] if phases else None}


def steady_step_seconds(batch_times: list[float], steps_per_epoch: int) -> list[float]:
    """Mean step time inside each epoch after the first (first to last batch of the epoch)."""
    epochs = [batch_times[i:i + steps_per_epoch] for i in range(0, len(batch_times), steps_per_epoch)]
    return [(e[-1] - e[0]) / (len(e) - 1) for e in epochs[1:] if len(e) > 1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--gpus", nargs="+", type=int, default=[1, 2, 4])
    parser.add_argument("--modes", nargs="+", choices=["graph", "eager"], default=["graph", "eager"])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--steps", type=int, default=30, help="steps per epoch")
    parser.add_argument("--smoke", action="store_true", help="tiny network on the CPU (gloo): checks the wiring")
    parser.add_argument("--deadline-s", type=float, default=1e9, help="skip GPU counts once this much time has passed")
    args = parser.parse_args()
    started = time.time()
    work = Path(tempfile.mkdtemp(prefix="ray_scaling_"))
    (work / "data").mkdir()
    (work / "data" / "dataset.json").write_text(json.dumps({"cases": {}}))
    env = {**WORKER_ENV, "PYTHONPATH": os.environ.get("PYTHONPATH", "")}
    ray.init(address="local", num_gpus=torch.cuda.device_count(), num_cpus=2 if args.smoke else None,
             include_dashboard=False,
             runtime_env={"env_vars": env})
    ray_ready = time.time() - started
    results = ResultFile(args.out, {"benchmark": "ray_train_scaling", "ray": ray.__version__, "ray_init_s": ray_ready})
    for mode in args.modes:
        graphed = mode == "graph" and not args.smoke  # CUDA graphs only exist on the GPU
        (work / mode).mkdir()
        trial = trial_config(work / "data", work / mode, args.epochs, args.steps, args.smoke, graphed)
        for gpus in args.gpus:
            if (gpus > torch.cuda.device_count() and not args.smoke) or time.time() - started > args.deadline_s:
                print(f"{mode} {gpus} GPU(s): skipped", flush=True)
                continue
            entry = run(gpus, trial, work / "results", use_gpu=not args.smoke)
            entry["mode"] = mode
            done = [*results.payload["results"], entry]
            one = next((r["samples_per_s"] for r in done if r["gpus"] == 1 and r["mode"] == mode), None)
            if one and entry["samples_per_s"]:
                entry["scaling_efficiency"] = entry["samples_per_s"] / (gpus * one)
            results.add(entry)
            print(f"Ray Train {mode} {gpus} GPU(s): {entry['samples_per_s']} samples/s, efficiency "
                  f"{entry.get('scaling_efficiency')}, fit {entry['fit_wall_s']:.0f} s, phases "
                  f"{entry['worker_phases_s_since_train_function_entered'][:1]}", flush=True)


if __name__ == "__main__":
    main()
