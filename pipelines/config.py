"""params.yaml -> one resolved configuration per study.

Resolution order (later wins):
1. the shared top-level sections (`prepare`, `split`, `train`, `evaluate`, ...),
2. the study's own overrides (`studies.<name>.<section>`); `task` and `init` (where the trials'
   starting weights come from, see pipelines/train.py) are per study only,
with the active profile (`profile: <name>`, overlay `profiles.<name>`) deep-merged over the whole
file first. A user switches to the paper's settings with `dvc exp run -S profile=paper`
(or by editing that one line); DVC tracks `profile` and `profiles`, so the right stages re-run.
The `ray` section is then filled from its scaling preset (`ray.preset`, a file in
ray_configs/presets/), keys written in params.yaml winning over the preset's.

Relative paths (params.yaml's and the stages' own data/, models/, metrics/, ...) are taken from
the workspace: the repository root, or NNMAMBA_WORKSPACE when set. A job submitted with
`ray job submit --working-dir .` runs on an uploaded copy of the code, so it names the checkout
(on storage every node sees) that holds the data and receives the outputs.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import subprocess
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
PARAMS_FILE = REPO_ROOT / "params.yaml"
PRESETS_DIR = REPO_ROOT / "ray_configs" / "presets"
WORKSPACE_ENV = "NNMAMBA_WORKSPACE"
STUDY_SECTIONS = ("dataset", "prepare", "split", "model", "train", "evaluate")


def deep_merge(base: dict, overlay: dict) -> dict:
    """Recursively merge `overlay` into a copy of `base`; lists and scalars are replaced."""
    merged = copy.deepcopy(base)
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def load_params(path: Path = PARAMS_FILE) -> dict:
    """The whole params file with its active profile applied."""
    params = yaml.safe_load(path.read_text())
    profile = params.get("profile", "default")
    profiles = params.get("profiles", {})
    if profile != "default":
        if profile not in profiles:
            raise KeyError(f"{path}: profile {profile!r} is not defined under 'profiles' (known: {sorted(profiles)})")
        params = deep_merge(params, profiles[profile])
    if "ray" in params:
        params["ray"] = apply_preset(params["ray"])
    return params


def apply_preset(ray_section: dict) -> dict:
    """The `ray` section filled from its named scaling preset; keys set in params.yaml win."""
    name = ray_section.get("preset")
    if name is None:
        return ray_section
    path = PRESETS_DIR / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))
        raise KeyError(f"params.yaml: ray.preset {name!r} has no file {path} (known presets: {known})")
    return deep_merge(yaml.safe_load(path.read_text()), ray_section)


def study_config(study: str, params: dict | None = None) -> dict:
    """Everything one study's stages need, with shared sections and study overrides merged."""
    params = load_params() if params is None else params
    studies = params.get("studies", {})
    if study not in studies:
        raise KeyError(f"study {study!r} is not defined in params.yaml (known: {sorted(studies)})")
    own = studies[study]
    config = {key: value for key, value in params.items() if key not in ("studies", "profiles")}
    for section in STUDY_SECTIONS:
        config[section] = deep_merge(params.get(section, {}), own.get(section, {}))
    config["study"] = study
    config["task"] = own["task"]
    if "init" not in own:
        raise KeyError(f"study {study!r} has no `init` in params.yaml: `nnmamba/models.py` trains from scratch, "
                       "`models/<study>` starts from that study's models (dvc.yaml tracks it as a dependency)")
    config["init"] = own["init"]
    return config


def workspace_root() -> Path:
    """Where relative data paths live: NNMAMBA_WORKSPACE when set, else the repository root."""
    return Path(os.path.expanduser(os.environ.get(WORKSPACE_ENV) or REPO_ROOT)).resolve()


def resolve_path(path: str | os.PathLike) -> Path:
    """Paths in params.yaml are relative to the workspace unless absolute."""
    path = Path(os.path.expanduser(str(path)))
    return path if path.is_absolute() else workspace_root() / path


def config_hash(config: Any) -> str:
    """A short stable digest, used to tell one training configuration's runs from another's."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:10]


def git_commit() -> str:
    """The commit the code ran at (with '-dirty' when the tree has changes), or 'unknown' outside git."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO_ROOT, capture_output=True, text=True, check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{commit}-dirty" if dirty else commit


def write_json(path: Path, payload: Any) -> None:
    """Write JSON atomically (temp file + rename) so a crash never leaves a half-written output."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n")
    tmp.replace(path)
