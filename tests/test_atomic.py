"""Atomic outputs (nnmamba.atomic, and the bundles and label maps written through it) on real files: a write that fails on a full disk leaves the previous
output byte-identical and no partial file, and its error names the output's path and the OS reason."""

from __future__ import annotations

import errno
import json
import shlex
import subprocess
import sys

import pytest
import torch
import torchio as tio

from full_disk import FullDisk, leftovers, snapshot, unshare_command
from nnmamba.atomic import WriteError, staged, staged_directory, write_file, write_new
from nnmamba.checkpoint import WEIGHTS_FILE, load_bundle, save_bundle
from nnmamba.models import build_model
from nnmamba.predict import save_label_map
from pipelines import workspace

ARCH = {"task": "segmentation", "backbone": "nnmamba", "variant": "mic", "in_channels": 1, "out_channels": 2,
        "input_shape": [16, 16, 16], "kwargs": {"base_channels": 4, "blocks_per_stage": 1}}


def no_space(error: pytest.ExceptionInfo, path) -> None:
    """The error is one line naming `path` and saying the disk is full."""
    assert error.value.errno == errno.ENOSPC
    assert str(error.value) == f"could not write {path}: [Errno 28] No space left on device"


def dead_pid() -> int:
    """The pid of a process that has exited."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_folder_is_replaced_only_once_complete(tmp_path, monkeypatch):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("previous")
    before = snapshot(target)
    FullDisk(monkeypatch, tmp_path, free=5)
    with pytest.raises(WriteError) as error:
        with staged_directory(target) as partial:
            write_new(partial / "a.txt", "fits")
            write_new(partial / "b.bin", b"x" * 100)
    no_space(error, target / "b.bin")
    assert snapshot(target) == before and leftovers(tmp_path) == []
    monkeypatch.undo()
    with staged_directory(target) as partial:
        write_new(partial / "a.txt", "new")
    assert snapshot(target) == {"a.txt": b"new"} and leftovers(tmp_path) == []


def test_outputs_of_one_block_are_swapped_in_together(tmp_path, monkeypatch):
    folder, file = tmp_path / "predictions", tmp_path / "metrics" / "summary.json"
    write_file(folder / "case.txt", "old case")
    write_file(file, "old summary")
    before = snapshot(tmp_path)
    FullDisk(monkeypatch, tmp_path / "metrics", free=3)
    with pytest.raises(WriteError) as error:
        with staged() as staging:
            write_new(staging.directory(folder) / "case.txt", "new case")
            staging.file(file, "new summary")
    no_space(error, file)
    assert snapshot(tmp_path) == before and leftovers(tmp_path) == []


def test_a_failing_write_of_a_file_keeps_the_old_one(tmp_path, monkeypatch):
    record = tmp_path / "metrics" / "test_summary.json"
    workspace.write_json(record, {"mic": {"test_dice_mean": {"mean": 0.5, "std": 0.1}}})
    before = record.read_bytes()
    FullDisk(monkeypatch, tmp_path, free=10)
    with pytest.raises(WriteError) as error:
        workspace.write_json(record, {"mic": {"test_dice_mean": {"mean": 0.7, "std": 0.0}}})
    no_space(error, record)
    assert record.read_bytes() == before and leftovers(tmp_path) == []


def test_a_bundle_on_a_full_disk_keeps_the_previous_one(tmp_path, monkeypatch):
    bundle = tmp_path / "models" / "mic-seed0"
    save_bundle(bundle, ARCH, build_model("segmentation", "mic", 1, 2, base_channels=4, blocks_per_stage=1).state_dict())
    before = snapshot(bundle)
    FullDisk(monkeypatch, tmp_path, free=len(before["arch.json"]) + len(before[WEIGHTS_FILE]) // 2)
    retrained = build_model("segmentation", "mic", 1, 2, base_channels=4, blocks_per_stage=1).state_dict()
    with pytest.raises(WriteError) as error:
        save_bundle(bundle, ARCH, retrained, {"channels": ["t1"]})
    no_space(error, bundle / WEIGHTS_FILE)
    assert snapshot(bundle) == before and leftovers(tmp_path) == []
    monkeypatch.undo()
    save_bundle(bundle, ARCH, retrained)
    model, _ = load_bundle(bundle)
    assert all(torch.equal(model.state_dict()[key], value) for key, value in retrained.items())


def test_leftovers_of_a_killed_writer_are_cleared_and_a_cut_short_swap_undone(tmp_path):
    dead, alive = dead_pid(), subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / f"out.partial-{dead}").mkdir()                  # killed while writing
        (tmp_path / f"out.old-{dead}").mkdir()                      # killed between the two renames:
        (tmp_path / f"out.old-{dead}" / "good.txt").write_text("previous")   # out/ itself is missing
        (tmp_path / f"out.partial-{alive.pid}").mkdir()             # another writer, still running
        with pytest.raises(RuntimeError):
            with staged_directory(tmp_path / "out"):
                raise RuntimeError("a failure before the swap")
        assert sorted(p.name for p in tmp_path.iterdir()) == ["out", f"out.partial-{alive.pid}"]
        assert snapshot(tmp_path / "out") == {"good.txt": b"previous"}
    finally:
        alive.kill()
        alive.wait()


def test_an_error_that_names_no_output_is_passed_on_unchanged(tmp_path):
    missing = tmp_path / "raw" / "case.nii.gz"
    with pytest.raises(FileNotFoundError) as error:
        with staged_directory(tmp_path / "out"):
            json.loads(missing.read_text())
    assert not isinstance(error.value, WriteError) and error.value.filename == str(missing)
    assert list(tmp_path.iterdir()) == []


def label_map() -> tio.LabelMap:
    return tio.LabelMap(tensor=torch.randint(0, 4, (1, 48, 48, 32), generator=torch.Generator().manual_seed(0)))


def test_a_label_map_on_a_full_disk_keeps_the_previous_file(tmp_path, monkeypatch):
    target = tmp_path / "predictions" / "case.nii.gz"
    save_label_map(label_map(), target)
    before = target.read_bytes()
    FullDisk(monkeypatch, tmp_path / "predictions", free=100)
    with pytest.raises(WriteError) as error:
        save_label_map(tio.LabelMap(tensor=torch.zeros(1, 48, 48, 32, dtype=torch.int64)), target)
    no_space(error, target)
    assert target.read_bytes() == before and leftovers(tmp_path) == []


def test_simpleitk_leaving_a_truncated_file_on_a_full_disk_is_an_error(tmp_path):
    """SimpleITK's NIfTI writer returns without error on a full disk, leaving an empty file: here the
    scratch folder save_label_map writes through is on a full tmpfs, in a private mount namespace."""
    scratch, target = tmp_path / "scratch", tmp_path / "out" / "case.nii.gz"
    scratch.mkdir()
    code = ("import sys, torch, torchio as tio; from pathlib import Path; from nnmamba.predict import save_label_map; "
            "save_label_map(tio.LabelMap(tensor=torch.randint(0, 4, (1, 48, 48, 32))), Path(sys.argv[1]))")
    # One page left: enough for tempfile's probe of the folder, not for the map (~18 KB compressed).
    script = (f"mount -t tmpfs -o size=8k tmpfs {scratch} && head -c 4096 /dev/zero > {scratch}/fill; "
              f"TMPDIR={scratch} {sys.executable} -c {shlex.quote(code)} {target}")
    done = subprocess.run([*unshare_command(), "sh", "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"nnmamba.atomic.WriteError: could not write {target}: [Errno 5] SimpleITK's output "
                           "does not read back whole"), done.stderr
    assert not target.parent.exists() or list(target.parent.iterdir()) == []
