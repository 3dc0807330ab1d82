"""The train stage as a Ray job: `ray job submit --working-dir . --runtime-env ray_configs/runtime_env.yaml`
to the session's `ray start --head` cluster (token auth on, dashboard on 127.0.0.1), reading the
data from a separate workspace (NNMAMBA_WORKSPACE, the stand-in for shared storage) and logging
over HTTP to a real `mlflow server`. Once the trial's first checkpoint is registered its Ray Train
worker process is killed; the trial must resume from that checkpoint and finish its epochs in
the same MLflow child run. Everything is read back through MLflow's REST API.

A second job goes through docs/cluster.md's single-host route as written: this module's own head
(`RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 ray start --head`, which must listen on 127.0.0.1 only) and
the default SQLite store in the workspace. Once it has finished, Ray is stopped and its temporary
files (the job's uploaded copy of the code among them) deleted; the registered model must still load.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import uuid
from pathlib import Path

import mlflow
import pytest
import requests
import torch
from mlflow.tracking import MlflowClient

from nnmamba.checkpoint import load_bundle
from pipelines import SINGLE_MACHINE_ENV
from tests.conftest import BIN, CLUSTER_STUDY, _wait_for_head, free_port, wait_for
from tests.listening import is_loopback, listening_sockets

pytestmark = pytest.mark.slow

STUDY = "brats2023"
EXPERIMENT = "nnmamba-seg-brats2023"
EPOCHS = CLUSTER_STUDY["train"]["epochs"]
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


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
    assert "[1 of 1 finished, 0 running]" in job["logs"]
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


def test_the_ui_s_views_are_in_the_servers_rest_answers(tracked):
    """What the MLflow UI reads (#17 item 1), from the server the job logged to: the experiment opens
    on runs, and the registered version says which trial it is, reachable by its `best` alias."""
    url, child = tracked["url"], tracked["children"][0]
    experiment_tags = {t["key"]: t["value"] for t in tracked["experiment"]["tags"]}
    assert experiment_tags["mlflow.experimentKind"] == "custom_model_development"
    name = f"{EXPERIMENT}-nnmamba-mic"
    best = rest(url, "GET", "registered-models/alias", params={"name": name, "alias": "best"})["model_version"]
    assert best["run_id"] == child["info"]["run_id"] and best["aliases"] == ["best"]
    tags = {t["key"]: t["value"] for t in best["tags"]}
    assert {k: tags[k] for k in ("study", "backbone", "variant", "seed")} == {
        "study": STUDY, "backbone": "nnmamba", "variant": "mic", "seed": "0"}
    assert {"selection_metric", "best_epoch", "git_commit"} <= set(tags), tags
    assert best["description"].startswith(f"{STUDY} ")


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


@pytest.fixture(scope="module")
def single_host_head(tmp_path_factory):
    """docs/cluster.md's one-machine head, this module's own: stopping it leaves the session's cluster up.
    Its job agent and Ray Client ports are not the defaults, which the session's head holds."""
    port, dashboard, agent, client = free_port(), free_port(), free_port(), free_port()
    temp_dir = tmp_path_factory.mktemp("ray1")
    subprocess.run([BIN / "ray", "get-auth-token", "--generate"], check=True, capture_output=True)
    # Not the test process's MLflow store: the job must find the workspace's default one.
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS")}
    log = temp_dir / "ray_start.log"
    with log.open("w") as output:
        head = subprocess.Popen(
            [BIN / "ray", "start", "--head", f"--port={port}", "--num-cpus=2", "--dashboard-host=127.0.0.1",
             f"--dashboard-port={dashboard}", f"--dashboard-agent-listen-port={agent}",
             f"--ray-client-server-port={client}", "--disable-usage-stats", f"--temp-dir={temp_dir}", "--block"],
            stdout=output, stderr=subprocess.STDOUT,
            env={**env, "PATH": f"{BIN}{os.pathsep}{env['PATH']}", "RAY_AUTH_MODE": "token", SINGLE_MACHINE_ENV: "0"},
        )
    _wait_for_head(head, log)
    yield {"process": head, "dashboard": f"http://127.0.0.1:{dashboard}", "temp_dir": temp_dir}
    if head.poll() is None:
        head.terminate()
        head.wait(timeout=120)


def submitted(env: dict, *args) -> bool:
    """`ray job submit` with `args`; False while a head just started has no job agent up yet."""
    try:
        ray_cli(env, "job", "submit", *args)
    except AssertionError as error:
        if "No available agent to submit job" in str(error):
            return False
        raise
    return True


@pytest.fixture(scope="module")
def stopped_job(single_host_head, cluster_project, tmp_path_factory):
    """README's `ray job submit --working-dir . -- NNMAMBA_WORKSPACE=... python -m pipelines.train`, with
    the default MLflow store; then Ray stopped and its temporary directory removed."""
    code, head = cluster_project["code"], single_host_head["process"]
    workspace = tmp_path_factory.mktemp("sqlite_workspace")
    shutil.copytree(cluster_project["workspace"] / "data", workspace / "data")
    dashboard, env = single_host_head["dashboard"], {"RAY_AUTH_MODE": "token"}
    submission = f"nnmamba-train-{uuid.uuid4().hex[:8]}"
    wait_for(lambda: submitted(env, "--address", dashboard, "--submission-id", submission, "--no-wait",
                               "--working-dir", code, "--runtime-env", code / "ray_configs" / "runtime_env.yaml",
                               "--", f"NNMAMBA_WORKSPACE={workspace}", "python", "-m", "pipelines.train", STUDY),
             120, "the new head's job agent", interval=2)
    sockets = set()

    def finished() -> bool:
        sockets.update(map(tuple, listening_sockets(head.pid)))   # the job's driver and workers included
        return job_info(env, dashboard, submission)["status"] in TERMINAL

    wait_for(finished, 900, "the job to finish", interval=2)
    info, logs = job_info(env, dashboard, submission), ray_cli(env, "job", "logs", "--address", dashboard, submission)
    copies = [p for p in single_host_head["temp_dir"].glob("session_*/runtime_resources/working_dir_files/*")
              if p.is_dir()]
    head.terminate()
    head.wait(timeout=120)
    shutil.rmtree(single_host_head["temp_dir"])   # Ray's session files: gone after a reboot, if not before
    return {"status": info["status"], "logs": logs, "workspace": workspace, "sockets": sorted(sockets),
            "copies": copies}


def test_the_single_host_head_and_its_job_listen_on_loopback_only(stopped_job):
    sockets = stopped_job["sockets"]
    assert {"gcs_server", "raylet", "ray::DashboardAgent", "ray::RayTrainWorker"} <= {s[0] for s in sockets}, sockets
    exposed = [s for s in sockets if not is_loopback(s[1])]
    # The one exception (docs/cluster.md): torch.distributed's rendezvous store, which the trial's
    # rank-0 Ray Train worker opens for the trial, listens on every interface whatever MASTER_ADDR
    # says; torch 2.13 has no option to bind it elsewhere.
    rendezvous = [s for s in exposed if s[0].startswith("ray::RayTrainWorker")]
    assert exposed == rendezvous and len({port for _, _, port in rendezvous}) == 1, exposed


def test_the_registered_model_loads_after_ray_is_stopped(stopped_job):
    assert stopped_job["status"] == "SUCCEEDED", stopped_job["logs"][-5000:]
    assert stopped_job["copies"], "the job did not run in a temporary copy of the code: the test proves nothing"
    workspace = stopped_job["workspace"].resolve()
    uri = f"sqlite:///{workspace}/mlflow.db"
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    assert Path(experiment.artifact_location).is_relative_to(workspace), experiment.artifact_location
    runs = client.search_runs([experiment.experiment_id])
    assert runs and all(r.info.artifact_uri.startswith(str(workspace)) for r in runs)
    name = f"{EXPERIMENT}-nnmamba-mic"
    [version] = client.search_model_versions(f"name = '{name}'")
    mlflow.set_tracking_uri(uri)
    logged = mlflow.pytorch.load_model(f"models:/{name}/{version.version}").eval()
    exported, arch = load_bundle(workspace / "models" / STUDY / "mic-seed0")
    x = torch.randn(1, arch["in_channels"], *arch["input_shape"])
    with torch.no_grad():
        torch.testing.assert_close(logged(x), exported(x))
