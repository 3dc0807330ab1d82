"""End to end on a real full disk (#16 item 4): `dvc repro` of evaluate and train with predictions/ or
models/ on a small tmpfs that holds the previous outputs. The failing stage names the path and
"No space left on device", and leaves the previous outputs byte-identical with no partial file
(DVC keeps them since dvc.yaml declares them `persist`; the stages replace them themselves).

The tmpfs is mounted in a private mount namespace (`unshare`), so nothing outside the test sees it;
where unshare or mount is not permitted the test is skipped (tests/full_disk.py injects the same
fault at os.write instead, in test_atomic.py and test_export_faults.py).
"""

from __future__ import annotations

import math
import os
import shlex
import subprocess
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from full_disk import leftovers, snapshot, unshare_command
from nnmamba.atomic import write_file
from nnmamba.checkpoint import model_from_arch, save_bundle
from pipelines import workspace
from pipelines.params import load_params
from pipelines.resolve import resolve_study
from pipelines.train import architecture
from project_copy import fresh_project
from tests.conftest import BIN, run_in

pytestmark = pytest.mark.slow

STUDY = "brats2023"
SEEDS = [0, 1]
PAGE = 4096
TINY = {
    "synthetic": {STUDY: {"n_cases": 4, "shape": [48, 48, 32]}},
    "split": {"val": 1, "test": 1},
    "model": {"base_channels": 4, "blocks_per_stage": 1},
    "train": {"variants": ["mic"], "seeds": SEEDS, "epochs": 1, "steps_per_epoch": 2, "samples_per_volume": 2,
              "queue_length": 4},
    "mlflow": {"register_models": False},
}


def pages(files: dict[str, bytes]) -> int:
    """The tmpfs pages a set of files takes (folders take none)."""
    return sum(math.ceil(len(data) / PAGE) for data in files.values())


def on_full_disk(root: Path, folder: str, size_pages: int, command: list[str], env: dict) -> tuple[int, str, Path]:
    """Run `command` in `root` with `folder` on a tmpfs of `size_pages` that first receives the folder's
    current content; returns its exit code, its output and a copy of what it left on that tmpfs."""
    after, log, stash = root.parent / f"{folder}-after", root.parent / f"{folder}.log", root.parent / f"{folder}-stash"
    script = (f"set -e; cd {shlex.quote(str(root))}; cp -a {folder} {shlex.quote(str(stash))}; "
              f"mount -t tmpfs -o size={size_pages * PAGE} tmpfs {folder}; cp -a {shlex.quote(str(stash))}/. {folder}/; "
              f"set +e; {shlex.join(command)} > {shlex.quote(str(log))} 2>&1; rc=$?; set -e; "
              f"mkdir {shlex.quote(str(after))}; cp -a {folder}/. {shlex.quote(str(after))}/; exit $rc")
    full_env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", **env}
    full_env.pop("MLFLOW_TRACKING_URI", None)
    done = subprocess.run([*unshare_command(), "sh", "-c", script], env=full_env, timeout=600)
    return done.returncode, log.read_text(), after


def previous_outputs(root: Path, monkeypatch) -> None:
    """What an earlier run left, written here instead of trained (the stages treat it as opaque): a bundle
    per trial of the study's own architecture, trials.json, predictions and metrics."""
    monkeypatch.setenv(workspace.WORKSPACE_ENV, str(root))
    study = resolve_study(load_params(root / "params.yaml").study(STUDY))
    index = workspace.load_index(STUDY)
    rows = []
    for seed in SEEDS:
        arch = architecture(study, index, "nnmamba", "mic")
        save_bundle(workspace.trial_model(STUDY, "mic", seed), arch, model_from_arch(arch).state_dict())
        rows.append({"backbone": "nnmamba", "variant": "mic", "seed": seed, "fold": None, "run_id": "earlier",
                     "model_dir": str(workspace.trial_model(STUDY, "mic", seed)), "best_val_dice_mean": 0.5,
                     "best_epoch": 1})
        write_file(workspace.trial_predictions(STUDY, "mic", seed) / "case.nii.gz", b"earlier labels")
    workspace.write_json(workspace.path(workspace.TRIALS, study=STUDY),
                         {"parent_run_id": "earlier", "config_hash": "earlier", "trials": rows})
    for template in (workspace.TRAIN_CURVES, workspace.TEST_PER_CASE, workspace.TEST_SUMMARY):
        write_file(workspace.path(template, study=STUDY), "earlier")


def test_a_full_disk_fails_evaluate_and_train_and_keeps_the_previous_outputs(tmp_path, ray_cluster, monkeypatch):
    root = fresh_project(tmp_path / "project", TINY, studies=[STUDY])
    env = ray_cluster["env"]
    run_in(root, "dvc", "repro", f"split@{STUDY}", env=env)
    previous_outputs(root, monkeypatch)
    models, predictions, metrics = (root / folder / STUDY for folder in ("models", "predictions", "metrics"))
    good_models, good_predictions, good_metrics = snapshot(models), snapshot(predictions), snapshot(metrics)

    # evaluate, forced, with predictions/ on a disk that the previous predictions fill.
    rc, log, after = on_full_disk(root, "predictions", pages(snapshot(root / "predictions")),
                                  ["dvc", "repro", "-s", "-f", f"evaluate@{STUDY}"], env)
    assert rc != 0
    assert f"evaluate: could not write {predictions}/mic-seed" in log and "No space left on device" in log, log
    assert snapshot(after / STUDY) == good_predictions and leftovers(after) == []
    assert snapshot(metrics) == good_metrics

    # train with models/ on a disk that holds the previous export, the first new bundle and half the
    # second one's weights.
    bundle = {name: data for name, data in good_models.items() if name.startswith("mic-seed0/")}
    size = pages(snapshot(root / "models")) + pages(bundle) + math.ceil(len(bundle["mic-seed0/model.pt"]) / PAGE) // 2
    rc, log, after = on_full_disk(root, "models", size, ["dvc", "repro", "-s", f"train@{STUDY}"], env)
    assert rc != 0
    assert f"train: could not write {models}/mic-seed1/model.pt: [Errno 28] No space left on device" in log, log
    assert snapshot(after / STUDY) == good_models and leftovers(after) == []
    assert snapshot(metrics) == good_metrics and leftovers(root) == []

    # MLflow: the study's parent run and both child runs FAILED, with the reason.
    client = MlflowClient(f"sqlite:///{root}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name(f"nnmamba-seg-{STUDY}").experiment_id])
    assert sorted((r.data.tags["run_type"], r.info.status) for r in runs) == [
        ("ablation", "FAILED"), ("trial", "FAILED"), ("trial", "FAILED")]
    assert all("No space left on device" in r.data.tags["failure"] for r in runs)
