"""Shared fixtures: one real Ray cluster per test session, and a throw-away copy of the project."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest


if TYPE_CHECKING:  # the GPU machines run the kernel tests without SimpleITK installed
    import SimpleITK as sitk

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session", autouse=True)
def unpacked_dir(tmp_path_factory) -> Path:
    """Training's unpacked case copies go to this session's temporary directory, not the user's cache.

    Autouse and session-wide, so it is set before the Ray cluster and project subprocesses inherit the environment.
    """
    directory = tmp_path_factory.mktemp("unpacked")
    previous = os.environ.get("NNMAMBA_UNPACKED_DIR")
    os.environ["NNMAMBA_UNPACKED_DIR"] = str(directory)
    yield directory
    if previous is None:
        del os.environ["NNMAMBA_UNPACKED_DIR"]
    else:
        os.environ["NNMAMBA_UNPACKED_DIR"] = previous


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory) -> dict:
    """A real head node started with `ray start` (token auth on, dashboard on 127.0.0.1 only).

    `--block` keeps `ray start` running as the owner of its node; terminating it shuts down this
    cluster only. (`ray stop` would kill every Ray process on the host, other sessions' included.)
    """
    port, dashboard = free_port(), free_port()
    temp_dir = tmp_path_factory.mktemp("ray")
    # The token in ~/.ray/auth_token (created when missing) turns token authentication on.
    subprocess.run([BIN / "ray", "get-auth-token", "--generate"], check=True, capture_output=True)
    log = temp_dir / "ray_start.log"
    with log.open("w") as output:
        head = subprocess.Popen(
            [BIN / "ray", "start", "--head", f"--port={port}", "--num-cpus=2", "--dashboard-host=127.0.0.1",
             f"--dashboard-port={dashboard}", "--disable-usage-stats", f"--temp-dir={temp_dir}", "--block"],
            stdout=output, stderr=subprocess.STDOUT,
            # The venv first on PATH, as after `source .venv/bin/activate`: job entrypoints run `python`.
            env={**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "RAY_AUTH_MODE": "token"},
        )
    _wait_for_head(head, log)
    address = f"127.0.0.1:{port}"
    # Clients of a token-authenticated cluster opt in with RAY_AUTH_MODE=token (token in ~/.ray/auth_token).
    yield {"address": address, "dashboard": f"http://127.0.0.1:{dashboard}",
           "env": {"RAY_ADDRESS": address, "RAY_AUTH_MODE": "token"}}
    head.terminate()
    head.wait(timeout=120)


def _wait_for_head(head: subprocess.Popen, log: Path, timeout_s: float = 300) -> None:
    """Until `ray start` reports the runtime up; its exit or a timeout fails with its log."""
    deadline = time.monotonic() + timeout_s
    while "Ray runtime started" not in log.read_text():
        if head.poll() is not None or time.monotonic() > deadline:
            head.kill()
            raise RuntimeError(f"ray start did not come up:\n{log.read_text()[-4000:]}")
        time.sleep(0.5)


def ablation_runs(client, experiment: str, variants: list[str], seeds: list[int]) -> tuple:
    """The one parent run of `experiment` and its child runs, which must be exactly the variant x seed grid."""
    found = client.get_experiment_by_name(experiment)
    runs = client.search_runs([found.experiment_id], max_results=100)
    parents = [r for r in runs if r.data.tags.get("run_type") == "ablation"]
    children = [r for r in runs if r.data.tags.get("run_type") == "trial"]
    assert len(parents) == 1
    assert sorted((r.data.tags["variant"], int(r.data.tags["seed"])) for r in children) == sorted(
        (v, s) for v in variants for s in seeds)
    return parents[0], children


def same_geometry(written: Path, reference: Path) -> sitk.Image:
    """The written image as a SimpleITK image, after checking it has the reference's size, spacing,
    origin and direction."""
    import SimpleITK as sitk

    ours, theirs = sitk.ReadImage(str(written)), sitk.ReadImage(str(reference))
    assert ours.GetSize() == theirs.GetSize()
    for getter in ("GetSpacing", "GetOrigin", "GetDirection"):
        np.testing.assert_allclose(getattr(ours, getter)(), getattr(theirs, getter)(), atol=1e-5)
    return ours


def wait_for(condition, timeout: float, what: str, interval: float = 0.5):
    """Poll `condition` until it returns something truthy; fail with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := condition():
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def move_outside_and_link(path: Path, outside: Path) -> Path:
    """Move ``path`` (a file or folder) to ``outside``, beyond a dataset root, and leave a symlink to it
    in its place: what a reader must refuse however readable the target is."""
    outside.parent.mkdir(parents=True, exist_ok=True)
    path.rename(outside)
    path.symlink_to(outside, target_is_directory=outside.is_dir())
    return outside


def run_in(root: Path, *command, env: dict | None = None, timeout: int = 900) -> subprocess.CompletedProcess:
    """Run a project command (dvc, python -m pipelines...) in `root` with the venv on PATH.

    MLFLOW_TRACKING_URI is not inherited (unless `env` sets it): `mlflow.set_tracking_uri` in a
    test exports it, and the project would then log into another test's store.
    """
    inherited = {key: value for key, value in os.environ.items() if key != "MLFLOW_TRACKING_URI"}
    full_env = {**inherited, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", **(env or {})}
    result = subprocess.run([str(c) for c in command], cwd=root, env=full_env, capture_output=True, text=True,
                            timeout=timeout)
    if result.returncode != 0:
        raise AssertionError(f"{command} failed ({result.returncode}):\n{result.stdout[-4000:]}\n{result.stderr[-6000:]}")
    return result


# A tiny study for the cluster tests: one trial (variant mic, seed 0) of four short epochs.
CLUSTER_STUDY = {
    "synthetic": {"brats2023": {"n_cases": 5, "shape": [48, 48, 32]}},
    "split": {"val": 1, "test": 1},
    "model": {"base_channels": 4, "blocks_per_stage": 2},
    "train": {"variants": ["mic"], "seeds": [0], "epochs": 4, "steps_per_epoch": 4, "samples_per_volume": 2,
              "queue_length": 4},
}


@pytest.fixture(scope="session")
def cluster_project(tmp_path_factory) -> dict:
    """The code (a git repo, as `ray job submit --working-dir` uploads it) and a separate workspace,
    standing in for shared storage, where the real stages prepared the tiny study's data."""
    # Imported here: the GPU machines run the kernel tests without the pipeline stack.
    from project_copy import fresh_project

    code = fresh_project(tmp_path_factory.mktemp("code"), CLUSTER_STUDY)
    workspace = tmp_path_factory.mktemp("workspace")
    for stage in ("synthesize", "prepare", "split"):
        run_in(code, "python", "-m", f"pipelines.{stage}", "brats2023", env={"NNMAMBA_WORKSPACE": str(workspace)})
    return {"code": code, "workspace": workspace, "overrides": CLUSTER_STUDY}
