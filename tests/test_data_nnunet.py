"""nnU-Net v2 / MSD reader, dataset.json dialects and the synthetic generator, on real .nrrd/.mha/.nii.gz files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from nnmamba.data.readers.dataset_json import read_dataset_json
from nnmamba.data.errors import DataError
from nnmamba.data.layouts import get_layout
from nnmamba.data.readers.nnunet import read_nnunet_dataset
from nnmamba.data.preprocessing.fingerprint import dataset_fingerprint
from nnmamba.data.preprocessing.preprocess import load_case, prepare_dataset
from nnmamba.data.synthetic.nnunet import NNUNET_CLASSES, write_synthetic_nnunet
from tests.conftest import move_outside_and_link

FOV = (96.0, 80.0, 78.0)
SPACING = (0.8 * 3, 0.8 * 3, 6.5)  # strongly anisotropic, like 0.8 x 0.8 x 6.5 mm scans (coarser in-plane)
LABELS = {0: "background", **{i + 1: name for i, name in enumerate(NNUNET_CLASSES)}}


@pytest.fixture(scope="module")
def nrrd_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("nnunet_nrrd")
    write_synthetic_nnunet(root, n_train=3, n_test=1, field_of_view_mm=FOV, spacing=SPACING, file_ending=".nrrd",
                           label_dtype="uint16", seed=4)
    return root


def _copy(root: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(root, tmp_path / "copy"))


def _write_json(root: Path, content: dict) -> None:
    (root / "dataset.json").write_text(json.dumps(content))


def test_reads_v2_dataset_with_channels_in_order(nrrd_root: Path) -> None:
    dataset = read_nnunet_dataset(nrrd_root, subsets=("imagesTr", "imagesTs"))
    assert dataset.channels == ("CT", "MR")
    assert dataset.labels == LABELS
    assert [(c.case_id, c.subset, c.label is not None) for c in dataset.cases] == [
        ("case_000", "train", True), ("case_001", "train", True), ("case_002", "train", True),
        ("case_003", "test", False)]
    case = dataset.cases[1]
    assert case.images == {"CT": nrrd_root / "imagesTr/case_001_0000.nrrd",
                           "MR": nrrd_root / "imagesTr/case_001_0001.nrrd"}
    assert case.label == nrrd_root / "labelsTr/case_001.nrrd"
    assert get_layout("nnunet").read(nrrd_root).cases == dataset.cases[:3]


def test_synthetic_files_are_what_the_generator_promises(nrrd_root: Path) -> None:
    for index, case in enumerate(read_nnunet_dataset(nrrd_root).cases):
        label = sitk.ReadImage(str(case.label))
        assert label.GetPixelIDTypeAsString() == "16-bit unsigned integer"
        ct = sitk.ReadImage(str(case.images["CT"]))
        for image in (ct, sitk.ReadImage(str(case.images["MR"]))):
            assert image.GetSize() == label.GetSize()
            np.testing.assert_allclose(image.GetDirection(), label.GetDirection())
        # Spacing follows the orientation: the 6.5 mm axis is stored where the case's codes put S.
        assert sorted(ct.GetSpacing()) == pytest.approx(sorted(SPACING))
        values = np.unique(sitk.GetArrayFromImage(label))
        assert set(values) <= set(LABELS) and 1 in values
        hu = sitk.GetArrayFromImage(ct)
        assert hu.min() < -900 and 100 < np.median(hu[sitk.GetArrayFromImage(label) == 1]) < 130  # air, liver
    directions = {sitk.ReadImage(str(c.label)).GetDirection() for c in read_nnunet_dataset(nrrd_root).cases}
    assert len(directions) == 3  # three orientations, one with permuted axes


def test_msd_dialect_and_mha_files(tmp_path: Path) -> None:
    write_synthetic_nnunet(tmp_path, n_train=2, channels=("T2",), field_of_view_mm=FOV, spacing=SPACING,
                           file_ending=".nii.gz", label_dtype="int32", dialect="msd")
    content = json.loads((tmp_path / "dataset.json").read_text())
    assert "modality" in content and "file_ending" not in content and content["labels"]["1"] == "liver"
    dataset = read_nnunet_dataset(tmp_path)
    assert dataset.channels == ("T2",) and dataset.labels == LABELS
    mha = tmp_path / "mha"
    write_synthetic_nnunet(mha, n_train=1, channels=("CT",), field_of_view_mm=FOV, spacing=SPACING,
                           file_ending=".mha", label_dtype="int32")
    subject = load_case(read_nnunet_dataset(mha).cases[0], LABELS)
    assert subject["label"].data.max() == 3 and subject["image"].num_channels == 1


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ({"labels": {"background": 0}}, "needs 'channel_names'"),
        ({"channel_names": {"0": "CT"}}, "needs 'labels'"),
        ({"channel_names": {"1": "CT"}, "labels": {"background": 0}}, "keys must be 0..0"),
        ({"channel_names": {"0": "CT", "1": "CT"}, "labels": {"background": 0}}, "repeats a channel name"),
        ({"channel_names": {"0": "CT", "00": "MR"}, "labels": {"background": 0}}, "each once"),
        ({"channel_names": {"0": "CT"}, "labels": {"background": 0, "liver": 1, "tumour": 1}},
         "'liver' and 'tumour' share the value 1"),
        ({"channel_names": {"0": "CT"}, "labels": {"background": 0, "liver": 2}}, r"consecutive integers 0..K-1"),
        ({"channel_names": {"0": "CT"}, "labels": {"background": 0, "tumour": [1, 2]}}, "region-based"),
        ({"channel_names": {"0": "CT"}, "labels": {"background": 0, "ignore": 1}}, "'ignore' label"),
        ({"channel_names": {"0": "CT"}, "labels": {"background": 0}, "file_ending": "nrrd"}, "file_ending"),
    ],
)
def test_bad_dataset_json_is_rejected(tmp_path: Path, content: dict, message: str) -> None:
    _write_json(tmp_path, content)
    with pytest.raises(DataError, match=message):
        read_dataset_json(tmp_path)


def test_missing_or_broken_dataset_json(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="dataset.json is missing"):
        read_dataset_json(tmp_path)
    (tmp_path / "dataset.json").write_text("{not json")
    with pytest.raises(DataError, match="cannot read"):
        read_dataset_json(tmp_path)


def test_missing_channel_file_names_the_case(nrrd_root: Path, tmp_path: Path) -> None:
    root = _copy(nrrd_root, tmp_path)
    (root / "imagesTr/case_001_0001.nrrd").unlink()
    with pytest.raises(DataError, match=r"case case_001: channel 0001 \(MR\) missing, expected .*case_001_0001.nrrd"):
        read_nnunet_dataset(root)


def test_missing_training_label_and_stray_files(nrrd_root: Path, tmp_path: Path) -> None:
    root = _copy(nrrd_root, tmp_path)
    (root / "labelsTr/case_002.nrrd").unlink()
    with pytest.raises(DataError, match="case case_002: label missing"):
        read_nnunet_dataset(root)
    shutil.copy(root / "labelsTr/case_000.nrrd", root / "labelsTr/case_002.nrrd")
    shutil.copy(root / "imagesTr/case_000_0000.nrrd", root / "imagesTr/case_009_0002.nrrd")
    with pytest.raises(DataError, match="case case_009: .* is channel 0002 but dataset.json declares 2"):
        read_nnunet_dataset(root)
    (root / "imagesTr/case_009_0002.nrrd").rename(root / "imagesTr/case_009.nrrd")
    with pytest.raises(DataError, match="must be named <case>_XXXX.nrrd"):
        read_nnunet_dataset(root)


def test_empty_dataset_and_missing_folder(tmp_path: Path) -> None:
    _write_json(tmp_path, {"channel_names": {"0": "CT"}, "labels": {"background": 0, "liver": 1},
                           "file_ending": ".nrrd"})
    with pytest.raises(DataError, match="imagesTr does not exist"):
        read_nnunet_dataset(tmp_path)
    (tmp_path / "imagesTr").mkdir()
    with pytest.raises(DataError, match=r"no cases in \['imagesTr'\]"):
        read_nnunet_dataset(tmp_path)


def test_label_geometry_and_values_are_validated_per_case(nrrd_root: Path, tmp_path: Path) -> None:
    root = _copy(nrrd_root, tmp_path)
    dataset = read_nnunet_dataset(root)
    case = dataset.cases[0]
    label = sitk.ReadImage(str(case.label))
    shifted = sitk.Image(label)
    shifted.SetOrigin(tuple(o + 5.0 for o in label.GetOrigin()))
    sitk.WriteImage(shifted, str(case.label))
    with pytest.raises(DataError, match="case case_000: .*case_000.nrrd has a different geometry"):
        load_case(case, dataset.labels)
    array = sitk.GetArrayFromImage(label)
    array[0, 0, 0] = 7
    undeclared = sitk.GetImageFromArray(array)
    undeclared.CopyInformation(label)
    sitk.WriteImage(undeclared, str(case.label))
    with pytest.raises(DataError, match=r"case case_000: label .* has values \[7\] outside the allowed \[0, 1, 2, 3\]"):
        load_case(case, dataset.labels)
    case.images["MR"].write_bytes(b"not an image")
    with pytest.raises(DataError, match="case case_000: cannot read .*case_000_0001.nrrd"):
        load_case(case, dataset.labels)


@pytest.mark.parametrize("linked", ["imagesTr/case_001_0001.nrrd", "labelsTr/case_001.nrrd"])
def test_a_file_symlinked_outside_the_root_is_refused(nrrd_root: Path, tmp_path: Path, linked: str) -> None:
    root = _copy(nrrd_root, tmp_path)
    target = move_outside_and_link(root / linked, tmp_path / "elsewhere" / "other.nrrd")
    with pytest.raises(DataError) as raised:
        read_nnunet_dataset(root)
    assert str(raised.value) == (f"case case_001: {root / linked} resolves to {target.resolve()}, "
                                 f"outside the dataset root {root.resolve()}")


def test_a_file_ending_that_matches_no_file_names_the_ending_found(nrrd_root: Path, tmp_path: Path) -> None:
    root = _copy(nrrd_root, tmp_path)
    content = json.loads((root / "dataset.json").read_text())
    _write_json(root, {**content, "file_ending": ".nii.gz"})
    with pytest.raises(DataError) as raised:
        read_nnunet_dataset(root)
    assert str(raised.value) == (f"{root / 'dataset.json'}: file_ending '.nii.gz' matches no file in imagesTr, "
                                 "which holds 6 '.nrrd' files: set file_ending to '.nrrd'")


def _make_constant(path: Path, value: float) -> None:
    image = sitk.ReadImage(str(path))
    constant = sitk.GetImageFromArray(np.full_like(sitk.GetArrayFromImage(image), value))
    constant.CopyInformation(image)
    sitk.WriteImage(constant, str(path))


# All channels zero (once a raw numpy traceback in the fingerprint's crop), and a constant CT
# channel (once silently taken: CT is normalised with the dataset's statistics, not its own).
@pytest.mark.parametrize(("files", "value"), [(("case_001_0000.nrrd", "case_001_0001.nrrd"), 0.0),
                                              (("case_001_0000.nrrd",), -1000.0)])
def test_a_constant_image_is_refused_by_fingerprint_and_prepare(nrrd_root: Path, tmp_path: Path,
                                                                  files: tuple[str, ...], value: float) -> None:
    root = _copy(nrrd_root, tmp_path)
    for name in files:
        _make_constant(root / "imagesTr" / name, value)
    dataset = read_nnunet_dataset(root)
    expected = (f"case case_001: {root / 'imagesTr' / files[0]}: image is constant (all voxels = {value}): "
                "nothing to crop or normalise")
    with pytest.raises(DataError) as raised:
        dataset_fingerprint(dataset.cases, dataset.labels, dataset.channels, progress=False)
    assert str(raised.value) == expected
    out_dir = tmp_path / "prepared" / "nnunet"
    with pytest.raises(DataError) as raised:
        prepare_dataset(dataset.cases, out_dir, dataset.labels, crop_margin=1, progress=False)
    assert str(raised.value) == expected
    assert list(out_dir.parent.iterdir()) == []  # nothing written, no staging directory left
