"""Per-trial Ray start-up cost of the train stage, and what the cpu-debug preset's knobs save.

Every Tune trial of the train stage starts processes (the Tune trial actor, Ray Train's
controller, worker and helper actors) before its first optimiser step; on a small CPU machine
that start-up, not the training, dominates a tiny study. This benchmark runs the same tiny study
(`python -m pipelines.train` on a copy of the project, fresh local Ray each time) with

  watcher+no-reuse   Ray's defaults,
  no-watcher         RAY_TRAIN_ENABLE_PREEMPTION_WATCHER=0 (no preemption-watcher actor per trial),
  no-watcher+reuse   the above plus TuneConfig(reuse_actors=True) (the cpu-debug preset),

interleaved `--repeats` times, and writes wall times and CPU seconds (of the stage's whole
process tree, which a shared machine's load disturbs far less than wall time) with the machine
to benchmarks/results/cpu_vm/trial_overhead.json.

    python benchmarks/trial_overhead.py --repeats 2
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import ray

from _common import REPO, code_version, machine

sys.path[:0] = [str(REPO), str(REPO / "tests")]

from pipelines.params import apply_preset, deep_merge  # noqa: E402
from project_copy import copy_project, write_params  # noqa: E402

SETTINGS = {
    "watcher+no-reuse": {"env_vars": {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "1"}, "reuse_actors": False},
    "no-watcher": {"env_vars": {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}, "reuse_actors": False},
    "no-watcher+reuse": {"env_vars": {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}, "reuse_actors": True},
}
STUDY = "brats2023"
TINY = {
    "synthetic": {STUDY: {"n_cases": 6, "shape": [48, 48, 32]}},
    "split": {"val": 1, "test": 2},
    "model": {"base_channels": 4, "blocks_per_stage": 2},
    "train": {"variants": ["baseline", "mic", "miccss"], "seeds": [0, 1], "epochs": 1, "steps_per_epoch": 2,
              "samples_per_volume": 2, "queue_length": 4},
    "mlflow": {"register_models": False},
}


def run_stage(code: Path, workspace: Path, *args: str) -> tuple[float, float]:
    """Run `python -m pipelines.<args>` on a fresh local Ray; its wall time and CPU time in seconds.

    The CPU time is that of the stage's whole process tree (its local Ray cluster and Ray's
    workers), sampled every 0.2 s: a process's last fraction of a sample interval is missed.
    """
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    env["NNMAMBA_WORKSPACE"] = str(workspace)
    cpu: dict[tuple[int, float], float] = {}
    workspace.mkdir(parents=True, exist_ok=True)
    log = workspace / "stage.log"
    started = time.perf_counter()
    with open(log, "w") as output:
        stage = subprocess.Popen([sys.executable, "-m", *args], cwd=code, env=env, stdout=output, stderr=output)
    root = psutil.Process(stage.pid)
    while stage.poll() is None:
        with contextlib.suppress(psutil.Error):
            for process in [root, *root.children(recursive=True)]:
                with contextlib.suppress(psutil.Error):
                    times = process.cpu_times()
                    cpu[(process.pid, process.create_time())] = times.user + times.system
        time.sleep(0.2)
    wall = time.perf_counter() - started
    if stage.returncode != 0:
        raise RuntimeError(f"{args} failed:\n{log.read_text()[-3000:]}")
    return wall, sum(cpu.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=2, help="interleaved runs of each setting")
    args = parser.parse_args()
    trials = len(TINY["train"]["variants"]) * len(TINY["train"]["seeds"])
    with tempfile.TemporaryDirectory() as tmp:
        code, workspace = Path(tmp) / "code", Path(tmp) / "workspace"
        copy_project(code)
        write_params(code, TINY)
        for stage in ("synthesize", "prepare", "split"):
            run_stage(code, workspace, f"pipelines.{stage}", STUDY)
        load = [os.getloadavg()[0]]
        walls: dict[str, list[float]] = {name: [] for name in SETTINGS}
        cpus: dict[str, list[float]] = {name: [] for name in SETTINGS}
        for repeat in range(args.repeats):
            for name, ray_overrides in SETTINGS.items():
                run = f"{name}-{repeat}"
                write_params(code, deep_merge(TINY, {
                    "ray": {**ray_overrides, "storage_path": str(Path(tmp) / run / "ray_results")},
                    "mlflow": {"tracking_uri": f"sqlite:///{Path(tmp) / run / 'mlflow.db'}"},
                }))
                wall, cpu = run_stage(code, workspace, "pipelines.train", STUDY)
                walls[name].append(wall)
                cpus[name].append(cpu)
                load.append(os.getloadavg()[0])
                print(f"{run}: {wall:.1f} s wall, {cpu:.1f} s CPU", flush=True)
    wall_baseline = statistics.median(walls["watcher+no-reuse"])
    cpu_baseline = statistics.median(cpus["watcher+no-reuse"])
    result = {
        "benchmark": "train stage wall time, tiny CPU study, fresh local Ray per run",
        "date": datetime.date.today().isoformat(),
        "machine": {**machine(), "ray": ray.__version__},
        "code": code_version(),
        "trials": trials,
        "max_concurrent_trials": apply_preset({"preset": "cpu-debug"}, REPO / "params.yaml")[0]["max_concurrent_trials"],
        "load_average_1min": {"min": min(load), "max": max(load)},
        "settings": {
            name: {
                "wall_s": [round(w, 1) for w in walls[name]],
                "median_wall_s": round(statistics.median(walls[name]), 1),
                "wall_saved_per_trial_s": round((wall_baseline - statistics.median(walls[name])) / trials, 1),
                "cpu_s": [round(c, 1) for c in cpus[name]],
                "median_cpu_s": round(statistics.median(cpus[name]), 1),
                "cpu_saved_per_trial_s": round((cpu_baseline - statistics.median(cpus[name])) / trials, 1),
            }
            for name in SETTINGS
        },
    }
    out = REPO / "benchmarks" / "results" / "cpu_vm" / "trial_overhead.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
