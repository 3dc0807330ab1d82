"""Shared fixtures: one real Ray cluster per test session, and a throw-away copy of the project."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
PROJECT_FILES = ("nnmamba", "pipelines", "ray_configs", "dvc.yaml", "params.yaml", ".dvcignore", "pyproject.toml")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory) -> dict:
    """A real head node started with `ray start` (token auth on, dashboard on 127.0.0.1 only)."""
    port, dashboard = free_port(), free_port()
    temp_dir = tmp_path_factory.mktemp("ray")
    # The token in ~/.ray/auth_token (created when missing) turns token authentication on.
    subprocess.run([BIN / "ray", "get-auth-token", "--generate"], check=True, capture_output=True)
    started = subprocess.run(
        [BIN / "ray", "start", "--head", f"--port={port}", "--num-cpus=2", "--dashboard-host=127.0.0.1",
         f"--dashboard-port={dashboard}", "--disable-usage-stats", f"--temp-dir={temp_dir}"],
        capture_output=True, text=True,
        # The venv first on PATH, as after `source .venv/bin/activate`: job entrypoints run `python`.
        env={**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "RAY_AUTH_MODE": "token"},
    )
    if started.returncode != 0:
        stop_ray_head(temp_dir, port)
        raise RuntimeError(f"ray start failed:\n{started.stdout[-3000:]}\n{started.stderr[-3000:]}")
    address = f"127.0.0.1:{port}"
    # Clients of a token-authenticated cluster opt in with RAY_AUTH_MODE=token (token in ~/.ray/auth_token).
    yield {"address": address, "dashboard": f"http://127.0.0.1:{dashboard}",
           "env": {"RAY_ADDRESS": address, "RAY_AUTH_MODE": "token"}}
    stop_ray_head(temp_dir, port)


def stop_ray_head(temp_dir: Path, port: int) -> None:
    """Stop the processes of the `ray start` above and their children, and nothing else.

    `ray stop` would stop every Ray cluster on the machine, other test sessions' included. The
    head's processes name its temp dir (logs, session) or its GCS port in their command lines.
    """
    def is_own(arg: str) -> bool:
        return arg.endswith((str(temp_dir), f":{port}")) or f"{temp_dir}{os.sep}" in arg

    own = [process for process in psutil.process_iter(["cmdline"]) if any(map(is_own, process.info["cmdline"] or []))]
    family = set(own)
    for parent in own:
        with contextlib.suppress(psutil.NoSuchProcess):
            family.update(parent.children(recursive=True))
    for process in family:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.terminate()
    _, alive = psutil.wait_procs(family, timeout=15)
    for process in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()


def write_project(root: Path, overrides: dict) -> Path:
    """Copy the project's code and pipeline into `root` as a fresh git+DVC repo, params overridden."""
    from pipelines.config import deep_merge

    for name in PROJECT_FILES:
        source = REPO / name
        if source.is_dir():
            shutil.copytree(source, root / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(source, root / name)
    params = deep_merge(yaml.safe_load((REPO / "params.yaml").read_text()), overrides)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for command in (["git", "init", "-q"], [BIN / "dvc", "init", "-q"],
                    [BIN / "dvc", "config", "core.analytics", "false"]):
        subprocess.run(command, cwd=root, check=True)
    subprocess.run(["git", "add", "-A"], cwd=root, check=True)
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "project"],
                   cwd=root, check=True)
    return root


def run_in(root: Path, *command, env: dict | None = None, timeout: int = 900) -> subprocess.CompletedProcess:
    """Run a project command (dvc, python -m pipelines...) in `root` with the venv on PATH."""
    full_env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", **(env or {})}
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
    code = write_project(tmp_path_factory.mktemp("code"), CLUSTER_STUDY)
    workspace = tmp_path_factory.mktemp("workspace")
    for stage in ("synthesize", "prepare", "split"):
        run_in(code, "python", "-m", f"pipelines.{stage}", "brats2023", env={"NNMAMBA_WORKSPACE": str(workspace)})
    return {"code": code, "workspace": workspace, "overrides": CLUSTER_STUDY}
