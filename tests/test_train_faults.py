"""Faults in the train stage, injected from outside on the session's real Ray cluster and read back
from MLflow and Ray Train's run storage: a Ray Train worker killed after epoch k of n, the stage
itself killed with one trial finished and one part-way, a forced re-run of the finished stage,
and a study whose loss diverges.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
from pathlib import Path

import psutil
import pytest
import yaml
from mlflow.tracking import MlflowClient

from project_copy import fresh_project, write_params
from tests.conftest import BIN, run_in, wait_for

pytestmark = pytest.mark.slow

STUDY = "brats2023"
EXPERIMENT = "nnmamba-seg-brats2023"
EPOCHS = 5
KILL_AFTER = 2                                  # mic-seed0's worker is killed once epoch 2 is checkpointed
TRIALS = ["mic-seed0", "mic-seed1"]
TINY = {
    "synthetic": {STUDY: {"n_cases": 5, "shape": [48, 48, 32]}},
    "split": {"val": 1, "test": 1},
    "model": {"base_channels": 4, "blocks_per_stage": 2},
    # About a second an epoch on 2 cores: long enough to kill a worker between two checkpoints.
    "train": {"variants": ["mic"], "seeds": [0, 1], "epochs": EPOCHS, "steps_per_epoch": 16,
              "samples_per_volume": 2, "queue_length": 4},
    "ray": {"max_concurrent_trials": 2},
}


def ray_list(cluster: dict, kind: str, *filters: str) -> list[dict]:
    """`ray list <kind>` of the session cluster (state API over its dashboard), as JSON."""
    args = [BIN / "ray", "list", kind, "--address", cluster["dashboard"], "--format", "json", "--detail",
            "--limit", "10000", *(arg for f in filters for arg in ("--filter", f))]
    out = subprocess.run(args, env={**os.environ, **cluster["env"]}, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    return [] if out.stdout.startswith("No resource") else json.loads(out.stdout)


def train_workers(cluster: dict) -> set[str]:
    """The actor ids of every Ray Train worker the cluster has run, alive and dead."""
    return {actor["actor_id"] for actor in ray_list(cluster, "actors", "class_name=RayTrainWorker")}


def live_workers(cluster: dict) -> dict[int, str]:
    """The cluster's live Ray Train workers: pid -> the Ray Train run they work for.

    They are the children of its raylet (the one given its GCS address: other Ray instances may run
    on the host) titled `ray::RayTrainWorker...`, and each works in a folder named after its run.
    Cheap enough to poll, unlike the state API's CLI.
    """
    flag = f"--gcs-address={cluster['address']}"
    for raylet in psutil.process_iter(["name", "cmdline"]):
        if raylet.info["name"] == "raylet" and flag in (raylet.info["cmdline"] or []):
            workers = {}
            for child in raylet.children():
                try:
                    if child.cmdline()[:1] and child.cmdline()[0].startswith("ray::RayTrainWorker"):
                        workers[child.pid] = Path(child.cwd()).name
                except psutil.Error:            # gone meanwhile
                    pass
            return workers
    raise AssertionError(f"no raylet of the cluster at {cluster['address']}")


def trial_worker(cluster: dict, trial: str, other_than: int | None = None) -> int | None:
    """The pid of the live worker of `trial`'s Ray Train run (one worker per trial in this preset)."""
    pids = [pid for pid, run in live_workers(cluster).items() if run.startswith(f"{STUDY}-{trial}-")]
    return next((pid for pid in pids if pid != other_than), None)


def checkpointed_epoch(root: Path, trial: str) -> int:
    """The epoch of the trial's latest registered checkpoint in Ray Train's run storage (0: none)."""
    for snapshot in root.glob(f"ray_results/{STUDY}-{trial}-*/checkpoint_manager_snapshot.json"):
        try:
            latest = json.loads(snapshot.read_text())["latest_checkpoint_result"]
        except json.JSONDecodeError:            # caught while Ray Train rewrites it
            return 0
        return int(latest["metrics"]["epoch"]) if latest else 0
    return 0


def child_runs(root: Path) -> dict[str, object]:
    """The study's MLflow trial runs, by trial name."""
    client = MlflowClient(f"sqlite:///{root}/mlflow.db")
    experiment = client.get_experiment_by_name(EXPERIMENT)
    if experiment is None:
        return {}
    runs = client.search_runs([experiment.experiment_id], "tags.run_type = 'trial'", max_results=100)
    return {run.data.tags["trial"]: run for run in runs}


def steps(root: Path, trial: str, key: str) -> list[int]:
    """The steps at which the trial's MLflow run logged `key`, in logging order."""
    client = MlflowClient(f"sqlite:///{root}/mlflow.db")
    run = child_runs(root).get(trial)
    return [m.step for m in client.get_metric_history(run.info.run_id, key)] if run else []


def histories(root: Path) -> dict[str, dict[str, list[int]]]:
    return {trial: {key: steps(root, trial, key) for key in ("epoch", "setup_time_s")} for trial in TRIALS}


def project_env(cluster: dict) -> dict:
    """run_in's environment, for a stage started in the background."""
    inherited = {key: value for key, value in os.environ.items() if key != "MLFLOW_TRACKING_URI"}
    return {**inherited, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", **cluster["env"]}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    """The tiny study's project with its data prepared and split (no training yet)."""
    root = fresh_project(tmp_path_factory.mktemp("faults"), TINY, studies=[STUDY])
    for stage in ("synthesize", "prepare", "split"):
        run_in(root, "python", "-m", f"pipelines.{stage}", STUDY)
    return root


def copy_of(prepared: Path, target: Path, overrides: dict | None = None) -> Path:
    shutil.copytree(prepared, target)
    if overrides:
        write_params(target, {**TINY, **overrides}, studies=[STUDY])
    return target


def kill_after(cluster: dict, root: Path, trial: str, epoch: int, other_than: int | None = None) -> tuple[int, int]:
    """SIGKILL `trial`'s Ray Train worker once `epoch` is checkpointed; (its pid, the epoch checkpointed then)."""
    worker = wait_for(lambda: trial_worker(cluster, trial, other_than), 300, f"{trial}'s worker", interval=0.1)
    wait_for(lambda: checkpointed_epoch(root, trial) >= epoch, 300, f"{trial}'s epoch {epoch}", interval=0.02)
    os.kill(worker, signal.SIGKILL)
    return worker, checkpointed_epoch(root, trial)


@pytest.fixture(scope="module")
def faults(prepared, tmp_path_factory, ray_cluster) -> dict:
    """Train the study's two trials side by side while killing mic-seed0's worker after epoch
    KILL_AFTER (Ray Train restarts it), then the restarted worker and the stage itself one epoch
    later, mic-seed1 being finished. Re-run the stage (mic-seed0 is left to train), then force a
    re-run of the finished stage through DVC."""
    root = copy_of(prepared, tmp_path_factory.mktemp("resume") / "project")
    log = root / "killed_stage.log"
    with log.open("w") as output:
        stage = subprocess.Popen([BIN / "python", "-m", "pipelines.train", STUDY], cwd=root,
                                 env=project_env(ray_cluster), stdout=output, stderr=subprocess.STDOUT)
    try:
        first, killed_at = kill_after(ray_cluster, root, "mic-seed0", KILL_AFTER)
        # The worker first, so that nothing is checkpointed after; then, once the driver has logged
        # that epoch and mic-seed1's last to MLflow, the stage.
        _, stopped_at = kill_after(ray_cluster, root, "mic-seed0", killed_at + 1, other_than=first)
        wait_for(lambda: stopped_at in steps(root, "mic-seed0", "epoch") and EPOCHS in steps(root, "mic-seed1", "epoch"),
                 300, "MLflow to log mic-seed0's last epoch and mic-seed1's end")
    finally:
        stage.kill()
        stage.wait()
    wait_for(lambda: not live_workers(ray_cluster), 120, "the killed stage's workers to go")
    before = histories(root)

    resumed = run_in(root, "python", "-m", "pipelines.train", STUDY, env=ray_cluster["env"])
    after = histories(root)

    jobs, versions = len(ray_list(ray_cluster, "jobs")), model_versions(root)
    rerun = run_in(root, "dvc", "repro", "-f", "-s", f"train@{STUDY}", env=ray_cluster["env"])
    return {"root": root, "killed_at": killed_at, "stopped_at": stopped_at, "before": before, "after": after,
            "resumed": resumed, "rerun": rerun, "new_jobs": len(ray_list(ray_cluster, "jobs")) - jobs,
            "versions": (versions, model_versions(root))}


def model_versions(root: Path) -> list[tuple[str, str]]:
    """(registered name, version) of every registered model version in the project's store."""
    client = MlflowClient(f"sqlite:///{root}/mlflow.db")
    return sorted((v.name, v.version) for v in client.search_model_versions())


def test_killed_worker_resumes_at_the_next_epoch_and_logs_each_epoch_once(faults):
    assert faults["killed_at"] == KILL_AFTER
    history = faults["after"]["mic-seed0"]
    assert history["epoch"] == list(range(1, EPOCHS + 1))
    # Start-up is logged at the first epoch of each start: the restarted worker began at epoch k+1
    # (and the re-run stage after the epoch its second worker was killed at).
    assert history["setup_time_s"] == [1, KILL_AFTER + 1, faults["stopped_at"] + 1]


def test_killed_stage_resumes_only_its_unfinished_trial(faults):
    stopped_at = faults["stopped_at"]
    assert KILL_AFTER < stopped_at < EPOCHS
    assert faults["before"]["mic-seed0"]["epoch"] == list(range(1, stopped_at + 1))
    out = faults["resumed"].stdout + faults["resumed"].stderr
    assert "train: 1 of 2 trials were trained before, read from their Ray Train runs: mic-seed1" in out
    assert "train brats2023: (mic, seed 0) done: best val_dice_mean" in out and "[1 of 1 finished, 0 running]" in out
    # The finished trial is read back, not trained again: its MLflow history is as it was.
    assert faults["before"]["mic-seed1"] == faults["after"]["mic-seed1"]
    assert faults["after"]["mic-seed1"] == {"epoch": list(range(1, EPOCHS + 1)), "setup_time_s": [1]}


def test_rerun_of_a_finished_stage_starts_no_ray(faults):
    root, out = faults["root"], faults["rerun"].stdout + faults["rerun"].stderr
    assert "ray: using" not in out and faults["new_jobs"] == 0, "the re-run connected to Ray"
    assert "train: 2 of 2 trials were trained before" in out
    before, after = faults["versions"]
    assert after == before and len(after) == len(TRIALS), "the re-run registered its models again"
    # The export is complete again, nothing was retrained.
    trials = json.loads((root / f"models/{STUDY}/trials.json").read_text())["trials"]
    assert sorted(f"{t['variant']}-seed{t['seed']}" for t in trials) == TRIALS
    assert all((root / f"models/{STUDY}/{t}/model.pt").is_file() for t in TRIALS)
    assert histories(root) == faults["after"]
    assert {run.info.status for run in child_runs(root).values()} == {"FINISHED"}


DIVERGING = {"train": {**TINY["train"], "variants": ["baseline", "mic"], "seeds": [0], "epochs": 2,
                       "optimizer": {"name": "adam", "lr": 1.0e6, "weight_decay": 0.001}}}


@pytest.fixture(scope="module")
def diverged(prepared, tmp_path_factory, ray_cluster) -> dict:
    """The stage run on a study whose learning rate (1e6) makes every trial's loss diverge."""
    root = copy_of(prepared, tmp_path_factory.mktemp("diverge") / "project", DIVERGING)
    assert yaml.safe_load((root / "params.yaml").read_text())["train"]["optimizer"]["lr"] == 1.0e6
    known = train_workers(ray_cluster)
    out = subprocess.run([BIN / "python", "-m", "pipelines.train", STUDY], cwd=root, env=project_env(ray_cluster),
                         capture_output=True, text=True, timeout=900)
    workers = train_workers(ray_cluster) - known
    return {"root": root, "out": out, "workers": workers}


def test_diverging_trials_fail_at_once_and_are_named(diverged):
    out = diverged["out"]
    assert out.returncode != 0
    error = out.stderr[out.stderr.index("RuntimeError: study brats2023"):].splitlines()
    assert error[0] == "RuntimeError: study brats2023: 2 of 2 trials failed: (baseline, seed 0), (mic, seed 0)"
    # Each trial's cause names the study, the network, the seed, the epoch and the loss.
    baseline, mic = error[1], error[2]
    assert baseline.startswith("  (baseline, seed 0): TrialDiverged: study brats2023, nnmamba/baseline seed 0: "
                               "training diverged at epoch ")
    assert "mean train loss" in baseline or "training loss became" in baseline
    assert mic.startswith("  (mic, seed 0): TrialDiverged: study brats2023, nnmamba/mic seed 0: training diverged")
    # Not retried: one Ray Train worker (group) per trial, though ray.max_failures allows 2 restarts.
    assert len(diverged["workers"]) == 2
    assert "[FailurePolicy] RETRY" not in out.stdout + out.stderr


def test_diverged_trials_leave_failed_mlflow_runs(diverged):
    root = diverged["root"]
    runs = child_runs(root)
    assert sorted(runs) == ["baseline-seed0", "mic-seed0"]
    assert {run.info.status for run in runs.values()} == {"FAILED"}
    assert all(steps(root, trial, "epoch") == [] for trial in runs)   # the first epoch failed, once
    client = MlflowClient(f"sqlite:///{root}/mlflow.db")
    experiment = client.get_experiment_by_name(EXPERIMENT)
    parent = client.search_runs([experiment.experiment_id], "tags.run_type = 'ablation'")[0]
    assert parent.info.status == "FAILED"
    assert "(baseline, seed 0), (mic, seed 0)" in parent.data.tags["failure"]
