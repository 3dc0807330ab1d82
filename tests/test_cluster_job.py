"""The train stage as a Ray job: `ray job submit --working-dir . --runtime-env ray_configs/runtime_env.yaml`
to the session's `ray start --head` cluster (token auth on, dashboard on 127.0.0.1), reading the
data from a separate workspace (NNMAMBA_WORKSPACE, the stand-in for shared storage) and logging
over HTTP to a real `mlflow server`. Once the trial's first checkpoint is registered its Ray Train
worker process is killed; the trial must resume from that checkpoint and finish its epochs in
the same MLflow child run. Everything is read back through MLflow's REST API.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import uuid
from pathlib import Path

import pytest
import requests

from tests.conftest import BIN, CLUSTER_STUDY, free_port

pytestmark = pytest.mark.slow

STUDY = "brats2023"
EXPERIMENT = "nnmamba-seg-brats2023"
EPOCHS = CLUSTER_STUDY["train"]["epochs"]
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


def wait_for(condition, timeout: float, what: str, interval: float = 0.5):
    """Poll `condition` until it returns something truthy; fail with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := condition():
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def answers(url: str) -> bool:
    try:
        return requests.get(f"{url}/health", timeout=5).ok
    except requests.RequestException:
        return False


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """`mlflow server` on 127.0.0.1: SQLite backend, artifacts served (proxied) from a local root."""
    root = tmp_path_factory.mktemp("mlflow_server")
    url = f"http://127.0.0.1:{free_port()}"
    with open(root / "server.log", "w") as log:
        server = subprocess.Popen(
            [BIN / "mlflow", "server", "--host", "127.0.0.1", "--port", url.rsplit(":", 1)[1],
             "--backend-store-uri", f"sqlite:///{root}/mlflow.db", "--artifacts-destination", str(root / "artifacts")],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
    try:
        wait_for(lambda: answers(url), 300, f"mlflow server (log: {root / 'server.log'})")
        yield {"url": url, "artifacts": root / "artifacts"}
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


def ray_cli(env: dict, *args) -> str:
    """A `ray` CLI command against the session cluster, as a user runs it; its stdout."""
    result = subprocess.run([BIN / "ray", *map(str, args)], env={**os.environ, **env}, capture_output=True,
                            text=True, timeout=120)
    if result.returncode != 0:
        raise AssertionError(f"ray {' '.join(map(str, args))} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result.stdout


def train_workers(env: dict, dashboard: str, job_id: str) -> list[dict]:
    """The job's Ray Train worker actors (alive and dead), from the state API."""
    listing = ray_cli(env, "list", "actors", "--address", dashboard, "--format", "json", "--detail", "--limit", "1000",
                      "--filter", "class_name=RayTrainWorker", "--filter", f"job_id={job_id}")
    return [] if listing.startswith("No resource") else json.loads(listing)


def job_info(env: dict, dashboard: str, submission: str) -> dict:
    """The submitted job's record (status, job_id, message) from `ray list jobs`."""
    return json.loads(ray_cli(env, "list", "jobs", "--address", dashboard, "--format", "json",
                              "--filter", f"submission_id={submission}"))[0]


@pytest.fixture(scope="module")
def job(ray_cluster, cluster_project, mlflow_server):
    """Submit the train stage, kill its Ray Train worker after the first checkpoint, wait for the end."""
    code, workspace = cluster_project["code"], cluster_project["workspace"]
    dashboard, env = ray_cluster["dashboard"], {"RAY_AUTH_MODE": ray_cluster["env"]["RAY_AUTH_MODE"]}
    submission = f"nnmamba-train-{uuid.uuid4().hex[:8]}"
    ray_cli(env, "job", "submit", "--address", dashboard, "--submission-id", submission, "--no-wait",
            "--working-dir", code, "--runtime-env", code / "ray_configs" / "runtime_env.yaml", "--",
            f"NNMAMBA_WORKSPACE={workspace}", f"MLFLOW_TRACKING_URI={mlflow_server['url']}",
            "python", "-m", "pipelines.train", STUDY)
    def started() -> str | None:
        info = job_info(env, dashboard, submission)
        assert info["status"] not in TERMINAL, info["message"]
        return info["job_id"]

    job_id = wait_for(started, 300, "the job's driver to start")
    worker = wait_for(lambda: [a for a in train_workers(env, dashboard, job_id) if a["state"] == "ALIVE"],
                      600, "a Ray Train worker")[0]
    snapshot = wait_for(lambda: next(workspace.glob("ray_results/*/checkpoint_manager_snapshot.json"), None),
                        600, "the first registered checkpoint", interval=0.05)
    registered = json.loads(snapshot.read_text())
    os.kill(worker["pid"], signal.SIGKILL)
    try:
        wait_for(lambda: job_info(env, dashboard, submission)["status"] in TERMINAL, 900, "the job to finish",
                 interval=2)
    finally:
        logs = ray_cli(env, "job", "logs", "--address", dashboard, submission)
        (workspace / f"{submission}.log").write_text(logs)
    return {"submission": submission, "job_id": job_id, "killed": worker, "registered": registered,
            "status": job_info(env, dashboard, submission)["status"], "logs": logs,
            "workers": train_workers(env, dashboard, job_id), "env": env, "dashboard": dashboard}


def rest(url: str, method: str, endpoint: str, **kwargs) -> dict:
    """One call to MLflow's REST API (/api/2.0/mlflow/...), JSON in and out."""
    response = requests.request(method, f"{url}/api/2.0/mlflow/{endpoint}", timeout=30, **kwargs)
    assert response.ok, f"{method} {endpoint}: {response.status_code} {response.text[:500]}"
    return response.json()


@pytest.fixture(scope="module")
def tracked(job, mlflow_server):
    """The experiment's runs and the child run's per-epoch history, read over HTTP."""
    url = mlflow_server["url"]
    experiment = rest(url, "GET", "experiments/get-by-name", params={"experiment_name": EXPERIMENT})["experiment"]
    runs = rest(url, "POST", "runs/search", json={"experiment_ids": [experiment["experiment_id"]],
                                                  "max_results": 100})["runs"]
    tags = [{t["key"]: t["value"] for t in run["data"].get("tags", [])} for run in runs]
    children = [run for run, tag in zip(runs, tags) if tag.get("run_type") == "trial"]
    parents = [run for run, tag in zip(runs, tags) if tag.get("run_type") == "ablation"]
    history = {key: rest(url, "GET", "metrics/get-history",
                         params={"run_id": children[0]["info"]["run_id"], "metric_key": key})["metrics"]
               for key in ("epoch", "train_loss", "val_dice_mean")} if children else {}
    return {"experiment": experiment, "children": children, "parents": parents, "history": history, "url": url}


def test_submitted_job_succeeds_and_writes_to_the_workspace(job, cluster_project):
    assert job["status"] == "SUCCEEDED", job["logs"][-5000:]
    assert "Trial status: 1 TERMINATED" in job["logs"]
    workspace, code = cluster_project["workspace"], cluster_project["code"]
    assert (workspace / "models" / STUDY / "mic-seed0" / "model.pt").is_file()
    trials = json.loads((workspace / "models" / STUDY / "trials.json").read_text())["trials"]
    assert [(t["variant"], t["seed"]) for t in trials] == [("mic", 0)]
    assert (workspace / "metrics" / STUDY / "train_curves.csv").is_file()
    assert not (code / "models").exists() and not (code / "mlflow.db").exists()


def test_killed_worker_resumes_from_its_checkpoint_in_the_same_mlflow_run(job, tracked):
    assert job["status"] == "SUCCEEDED", job["logs"][-5000:]
    assert job["registered"]["latest_checkpoint_result"] is not None
    # The preset runs one worker per trial, so any other worker pid is the restarted group's.
    assert {w["pid"] for w in job["workers"]} - {job["killed"]["pid"]}, "no replacement worker was started"
    assert len(tracked["children"]) == 1, "the trial's MLflow run was duplicated"
    child = tracked["children"][0]
    assert child["info"]["status"] == "FINISHED"
    epochs = sorted(m["step"] for m in tracked["history"]["epoch"])
    # One value per epoch: the resumed attempt continued after the checkpoint instead of redoing epoch 1.
    assert epochs == list(range(1, EPOCHS + 1))
    assert sorted(int(m["value"]) for m in tracked["history"]["epoch"]) == epochs
    assert len(tracked["history"]["train_loss"]) == EPOCHS


def test_runs_read_back_over_rest(tracked, mlflow_server):
    assert len(tracked["parents"]) == 1
    child = tracked["children"][0]
    tags = {t["key"]: t["value"] for t in child["data"]["tags"]}
    params = {p["key"]: p["value"] for p in child["data"]["params"]}
    assert tags["mlflow.parentRunId"] == tracked["parents"][0]["info"]["run_id"]
    assert tags["variant"] == "mic" and tags["seed"] == "0" and tags["task"] == "segmentation"
    assert params["train.epochs"] == str(EPOCHS) and params["variant"] == "mic"
    assert child["info"]["artifact_uri"].startswith("mlflow-artifacts:/")
    models = rest(tracked["url"], "POST", "logged-models/search",
                  json={"experiment_ids": [tracked["experiment"]["experiment_id"]]})["models"]
    assert [m["info"]["source_run_id"] for m in models] == [child["info"]["run_id"]]
    registered = rest(tracked["url"], "GET", "registered-models/get", params={"name": f"{EXPERIMENT}-nnmamba-mic"})
    assert [v["run_id"] for v in registered["registered_model"]["latest_versions"]] == [child["info"]["run_id"]]
    stored = list(Path(mlflow_server["artifacts"]).rglob("MLmodel"))
    assert len(stored) == 1, "the logged model's files are not in the server's artifact store"


def test_local_run_never_joins_a_running_cluster(ray_cluster):
    """With a `ray start` cluster up on the host and no address given, a stage starts its own Ray."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    code = ("from pipelines.cluster import connect_ray; from pipelines.params import load_params; import ray; "
            "connect_ray(load_params().study('brats2023').ray); print('GCS=' + ray.get_runtime_context().gcs_address)")
    out = subprocess.run([BIN / "python", "-c", code], cwd=Path(__file__).resolve().parents[1], env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    gcs = out.stdout.split("GCS=")[1].strip()
    assert gcs != ray_cluster["address"] and "using a private local Ray" in out.stdout
