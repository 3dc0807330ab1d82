"""Shared fixtures: one real Ray cluster per test session, and a throw-away copy of the project."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
PROJECT_FILES = ("nnmamba", "pipelines", "dvc.yaml", "params.yaml", ".dvcignore", "pyproject.toml")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory) -> dict:
    """A real head node started with `ray start` (token auth on, dashboard on 127.0.0.1 only)."""
    port, dashboard = free_port(), free_port()
    temp_dir = tmp_path_factory.mktemp("ray")
    subprocess.run(
        [BIN / "ray", "start", "--head", f"--port={port}", "--num-cpus=2", "--dashboard-host=127.0.0.1",
         f"--dashboard-port={dashboard}", "--disable-usage-stats", f"--temp-dir={temp_dir}"],
        check=True, capture_output=True,
    )
    address = f"127.0.0.1:{port}"
    # Clients of a token-authenticated cluster opt in with RAY_AUTH_MODE=token (token in ~/.ray/auth_token).
    yield {"address": address, "dashboard": f"http://127.0.0.1:{dashboard}",
           "env": {"RAY_ADDRESS": address, "RAY_AUTH_MODE": "token"}}
    subprocess.run([BIN / "ray", "stop", "--force"], capture_output=True)


def write_project(root: Path, overrides: dict, studies: tuple[str, ...] | None = None) -> Path:
    """Copy the project's code and pipeline into `root` as a fresh git+DVC repo, params overridden.

    `studies` keeps only those studies (and the synthetic datasets they read), so a test's
    `dvc repro` runs its own task's stages, not every study in params.yaml.
    """
    from pipelines.config import deep_merge

    for name in PROJECT_FILES:
        source = REPO / name
        if source.is_dir():
            shutil.copytree(source, root / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(source, root / name)
    params = deep_merge(yaml.safe_load((REPO / "params.yaml").read_text()), overrides)
    if studies is not None:
        params["studies"] = {name: params["studies"][name] for name in studies}
        synthetic = {study["dataset"]["synthetic"] for study in params["studies"].values()}
        params["synthetic"] = {name: spec for name, spec in params["synthetic"].items() if name in synthetic}
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
