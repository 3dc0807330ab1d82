"""Test and benchmark helper: a throw-away copy of this checkout's project (code, pipeline and params),
optionally its own git+DVC repo.

End-to-end tests and the pipeline benchmarks run the real stages in such a copy, so that nothing
they write (data, DVC cache, MLflow store, Ray results) lands in the checkout, and `dvc repro`
starts with nothing cached. One copy routine for all of them keeps the file list in one place.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import yaml

from pipelines.params import deep_merge

REPO = Path(__file__).resolve().parent.parent
PROJECT_FILES = ("nnmamba", "pipelines", "ray_configs", "dvc.yaml", "params.yaml", ".dvcignore", "pyproject.toml")


def copy_project(root: Path) -> Path:
    """Copy the project's code and pipeline files, params.yaml as it is, into `root`."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for name in PROJECT_FILES:
        source = REPO / name
        if source.is_dir():
            shutil.copytree(source, root / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(source, root / name)
    return root


def write_params(root: Path, overrides: dict, studies: Sequence[str] | None = None) -> None:
    """Write the checkout's params.yaml with `overrides` merged in to `root`.

    `studies` keeps only those studies (and the synthetic datasets they read), so a copy runs
    one task's pipeline, not every study in params.yaml.
    """
    params = deep_merge(yaml.safe_load((REPO / "params.yaml").read_text()), overrides)
    if studies is not None:
        params["studies"] = {name: params["studies"][name] for name in studies}
        used = {study["dataset"].get("synthetic") for study in params["studies"].values()}
        params["synthetic"] = {name: spec for name, spec in params["synthetic"].items() if name in used}
    (Path(root) / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def init_repository(root: Path) -> None:
    """Make `root` a git+DVC repository (DVC analytics off) with everything in it committed."""
    dvc = Path(sys.executable).parent / "dvc"
    for command in (["git", "init", "-q"], [dvc, "init", "-q"], [dvc, "config", "core.analytics", "false"],
                    ["git", "add", "-A"],
                    ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "project"]):
        subprocess.run(command, cwd=root, check=True)


def fresh_project(root: Path, overrides: dict | None = None, studies: Sequence[str] | None = None) -> Path:
    """A copy of the project in `root` as a fresh git+DVC repository, params overridden where asked."""
    copy_project(root)
    if overrides or studies is not None:
        write_params(root, overrides or {}, studies)
    init_repository(root)
    return Path(root)
