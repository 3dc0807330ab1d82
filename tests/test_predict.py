"""`nnmamba predict`: raw inputs found, preprocessed with the model's plan, labels written in the input's geometry.

A voxel-wise "oracle" network (class 1 where the normalised CT exceeds a threshold) makes the expected
output computable by brute force on the raw file with NumPy, so the whole chain (reorientation,
normalisation, sliding windows, mapping back) is checked voxel for voxel, not just its shapes.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
import torchio as tio
from torch import nn

from nnmamba.backbones import build_network
from nnmamba.checkpoint import save_bundle
from nnmamba.data.errors import DataError
from nnmamba.data.synthetic.amos import write_synthetic_amos
from nnmamba.data.synthetic.brats import write_synthetic_brats
from nnmamba.data.synthetic.nnunet import write_synthetic_nnunet
from nnmamba.models import build_model
from nnmamba.predict import find_input_cases, predict_cases
from pipelines.cli import main
from tests.conftest import REPO, same_geometry

CT_CLIP, CT_MEAN, CT_STD = (-200.0, 400.0), 100.0, 40.0
THRESHOLD_HU = 80.5  # HU are integers: no voxel sits on the threshold


class ThresholdOracle(nn.Module):
    """Two-class logits from channel 0: class 1 where it exceeds `threshold` (voxel-wise, so windows agree)."""

    def __init__(self, threshold: float):
        super().__init__()
        self.threshold = threshold
        self.windows_seen = 0  # windows (batch rows) it was run on: mirror TTA runs each 2^k times

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.windows_seen += len(x)
        margin = (x[:, :1] - self.threshold) * 100
        return torch.cat([-margin, margin], dim=1)


def _record(channels: list[str], target_spacing: list[float] | None = None, patch: list[int] | None = None) -> dict:
    normalization = [{"channel": c, "scheme": "ct", "clip": list(CT_CLIP), "mean": CT_MEAN, "std": CT_STD}
                     if c == "CT" else {"channel": c, "scheme": "zscore"} for c in channels]
    return {"task": "segmentation", "channels": channels, "labels": {"0": "background", "1": "bright"},
            "patch_size": patch or [32, 32, 16], "overlap": 0.5,
            "plan": {"normalization": normalization, "target_spacing": target_spacing,
                     "image_interpolation": "linear", "crop_margin": 2}}


def _oracle() -> ThresholdOracle:
    return ThresholdOracle((THRESHOLD_HU - CT_MEAN) / CT_STD)


@pytest.fixture(scope="module")
def mha_inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("nnunet_mha")
    write_synthetic_nnunet(root, n_train=0, n_test=3, field_of_view_mm=(96.0, 80.0, 78.0), spacing=(2.4, 2.4, 6.5),
                           file_ending=".mha", seed=6)
    return root / "imagesTs"


def test_multi_channel_inputs_are_grouped_by_nnunet_names(mha_inputs: Path, tmp_path: Path) -> None:
    cases = find_input_cases(mha_inputs, ["CT", "MR"])
    assert [c.case_id for c in cases] == ["case_000", "case_001", "case_002"]
    assert cases[1].images == {"CT": mha_inputs / "case_001_0000.mha", "MR": mha_inputs / "case_001_0001.mha"}
    assert find_input_cases(mha_inputs / "case_002_0001.mha", ["CT", "MR"]) == [cases[2]]
    folder = Path(shutil.copytree(mha_inputs, tmp_path / "inputs"))
    (folder / "notes.json").write_text("{}")  # not an image: ignored
    (folder / "case_001_0001.mha").unlink()
    with pytest.raises(DataError, match=r"case case_001: channel 0001 \(MR\) missing, expected .*case_001_0001.mha"):
        find_input_cases(folder, ["CT", "MR"])
    (folder / "case_000_0000.mha").rename(folder / "case_000.mha")
    with pytest.raises(DataError, match="case_000.mha: a 2-channel model reads files named <case>_0000.mha"):
        find_input_cases(folder, ["CT", "MR"])
    with pytest.raises(DataError, match="no image file"):
        find_input_cases(_empty(tmp_path), ["CT"])
    with pytest.raises(DataError, match="does not exist"):
        find_input_cases(tmp_path / "nowhere", ["CT"])


def test_brats_case_folders_are_read_by_their_channel_names_and_a_bad_name_lists_the_order(tmp_path: Path) -> None:
    channels = ["t1c", "t1n", "t2f", "t2w"]
    ids = write_synthetic_brats(tmp_path / "brats", n_cases=2, shape=(16, 16, 12))
    cases = find_input_cases(tmp_path / "brats", channels)   # a folder of case folders, as BraTS ships them
    assert [c.case_id for c in cases] == ids
    assert cases[0].images == {name: tmp_path / "brats" / ids[0] / f"{ids[0]}-{name}.nii.gz" for name in channels}
    assert find_input_cases(tmp_path / "brats" / ids[1] / f"{ids[1]}-t2f.nii.gz", channels) == [cases[1]]
    assert find_input_cases(tmp_path / "brats" / ids[1], channels) == [cases[1]]   # the -seg label is skipped
    (tmp_path / "brats" / ids[0] / f"{ids[0]}-t2w.nii.gz").unlink()
    with pytest.raises(DataError, match=rf"channel 0003 \(t2w\) missing, expected file .*{ids[0]}-t2w.nii.gz"):
        find_input_cases(tmp_path / "brats", channels)
    (tmp_path / "brats" / ids[1] / f"{ids[1]}-t1c.nii.gz").rename(tmp_path / "brats" / ids[1] / "flair.nii.gz")
    with pytest.raises(DataError, match="flair.nii.gz: .* in this order: 0000 t1c, 0001 t1n, 0002 t2f, 0003 t2w"):
        find_input_cases(tmp_path / "brats" / ids[1], channels)


def _empty(tmp_path: Path) -> Path:
    (tmp_path / "empty").mkdir()
    return tmp_path / "empty"


def test_single_channel_models_take_amos_names(tmp_path: Path) -> None:
    write_synthetic_amos(tmp_path, {"CT": {"imagesTs": 2}, "MR": {"imagesTs": 1}}, field_of_view_mm=(96, 80, 60))
    cases = find_input_cases(tmp_path / "imagesTs", ["CT"])
    assert [c.case_id for c in cases] == ["amos_0001", "amos_0002", "amos_0500"]  # not "amos" channel 0001
    assert cases[0].images == {"CT": tmp_path / "imagesTs/amos_0001.nii.gz"}


def test_labels_match_brute_force_in_the_input_geometry(mha_inputs: Path, tmp_path: Path) -> None:
    cases = find_input_cases(mha_inputs, ["CT", "MR"])
    written = predict_cases(_oracle(), _record(["CT", "MR"]), cases, tmp_path / "out", device="cpu", progress=False)
    assert [p.name for p in written] == ["case_000.mha", "case_001.mha", "case_002.mha"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [p.name for p in written]  # no partial files
    for case, path in zip(cases, written):
        ours = same_geometry(path, case.images["CT"])
        hu = sitk.GetArrayFromImage(sitk.ReadImage(str(case.images["CT"]))).astype(np.float64)
        expected = (np.clip(hu, *CT_CLIP) > THRESHOLD_HU).astype(np.uint8)
        np.testing.assert_array_equal(sitk.GetArrayFromImage(ours), expected)
    # The oracle is flip-equivariant, so mirroring must not change the labels; that it ran, the window count shows.
    plain, flipped = _oracle(), _oracle()
    once = predict_cases(plain, _record(["CT", "MR"]), cases[:1], tmp_path / "once", device="cpu", progress=False)
    mirrored = predict_cases(flipped, _record(["CT", "MR"]), cases[:1], tmp_path / "tta", device="cpu",
                             mirror_axes=(0, 1, 2), progress=False)
    assert flipped.windows_seen == 8 * plain.windows_seen > 0
    np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(mirrored[0]))),
                                  sitk.GetArrayFromImage(sitk.ReadImage(str(once[0]))))


def test_resampling_plans_map_probabilities_back(mha_inputs: Path, tmp_path: Path) -> None:
    cases = find_input_cases(mha_inputs, ["CT", "MR"])[:2]
    record = _record(["CT", "MR"], target_spacing=[1.8, 1.8, 4.0])
    for case, path in zip(cases, predict_cases(_oracle(), record, cases, tmp_path, device="cpu", progress=False)):
        ours = same_geometry(path, case.images["CT"])
        hu = sitk.GetArrayFromImage(sitk.ReadImage(str(case.images["CT"])))
        agreement = (sitk.GetArrayFromImage(ours) == (hu > THRESHOLD_HU)).mean()
        assert agreement > 0.95  # interpolated twice (to 1.8 x 1.8 x 4 mm and back)


def test_cli_predicts_with_a_model_bundle(mha_inputs: Path, tmp_path: Path) -> None:
    arch = {"task": "segmentation", "variant": "miccss", "in_channels": 2, "out_channels": 2,
            "kwargs": {"base_channels": 4, "blocks_per_stage": 2}}
    network = build_model("segmentation", "miccss", 2, 2, base_channels=4, blocks_per_stage=2)
    save_bundle(tmp_path / "bundle", arch, network.state_dict(), _record(["CT", "MR"], patch=[32, 32, 16]))
    command = [sys.executable, "-m", "pipelines.cli", "predict", "--model", str(tmp_path / "bundle"),
               "--input", str(mha_inputs / "case_001_0000.mha"), "--output", str(tmp_path / "out"),
               "--device", "cpu"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "1 label file(s)" in result.stdout and "predict" in result.stderr  # tqdm progress on stderr
    written = tmp_path / "out/case_001.mha"
    labels = sitk.GetArrayFromImage(same_geometry(written, mha_inputs / "case_001_0000.mha"))
    assert set(np.unique(labels)) <= {0, 1}
    with pytest.raises(SystemExit, match=r"nnmamba predict: input .*missing does not exist"):
        main([*command[3:7], str(tmp_path / "missing"), *command[8:]])


def test_short_flags_and_saved_probabilities_match_the_label_file(mha_inputs: Path, tmp_path: Path) -> None:
    arch = {"task": "segmentation", "variant": "miccss", "in_channels": 2, "out_channels": 2,
            "kwargs": {"base_channels": 4, "blocks_per_stage": 2}}
    network = build_model("segmentation", "miccss", 2, 2, base_channels=4, blocks_per_stage=2)
    save_bundle(tmp_path / "bundle", arch, network.state_dict(), _record(["CT", "MR"], patch=[32, 32, 16]))
    main(["predict", "-m", str(tmp_path / "bundle"), "-i", str(mha_inputs / "case_002_0000.mha"),
          "-o", str(tmp_path / "out"), "-d", "cpu", "--save-probabilities"])
    labels = tio.LabelMap(tmp_path / "out/case_002.mha").numpy()[0]
    saved = np.load(tmp_path / "out/case_002.npz")
    probabilities = saved["probabilities"].astype(np.float32)
    assert probabilities.shape == (2, *labels.shape) and list(saved["labels"]) == ["background", "bright"]
    np.testing.assert_allclose(probabilities.sum(axis=0), 1.0, atol=2e-3)   # float16, background filled in
    decided = np.abs(probabilities[1] - probabilities[0]) > 1e-2            # float16 ties left out
    assert np.array_equal(probabilities.argmax(axis=0)[decided], labels[decided])


@pytest.mark.parametrize(("backbone", "options"), [("segresnet", {"init_filters": 8}),
                                                    ("unetr", {"feature_size": 8, "hidden_size": 48, "mlp_dim": 96,
                                                               "num_heads": 4})])
def test_cli_predicts_with_a_competitor_backbones_bundle(mha_inputs: Path, tmp_path: Path, backbone: str,
                                                          options: dict) -> None:
    """A bundle of any backbone predicts through the CLI exactly as the network it was saved from."""
    patch = [32, 32, 16]
    torch.manual_seed(0)
    network = build_network("segmentation", backbone, None, 2, 2, patch, **options).eval()
    arch = {"task": "segmentation", "backbone": backbone, "variant": None, "in_channels": 2, "out_channels": 2,
            "input_shape": patch, "kwargs": options}
    record = _record(["CT", "MR"], patch=patch)
    save_bundle(tmp_path / "bundle", arch, network.state_dict(), record)
    command = [sys.executable, "-m", "pipelines.cli", "predict", "--model", str(tmp_path / "bundle"),
               "--input", str(mha_inputs / "case_001_0000.mha"), "--output", str(tmp_path / "out"), "--device", "cpu"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    expected = predict_cases(network, record, find_input_cases(mha_inputs / "case_001_0000.mha", ["CT", "MR"]),
                             tmp_path / "in_process", device="cpu", progress=False)[0]
    written = same_geometry(tmp_path / "out/case_001.mha", mha_inputs / "case_001_0000.mha")
    assert np.array_equal(sitk.GetArrayFromImage(written), sitk.GetArrayFromImage(sitk.ReadImage(str(expected))))
