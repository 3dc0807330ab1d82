"""prepare_dataset / load_preprocessed / to_raw_geometry against a NiBabel+NumPy reference."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch
import torch.nn.functional as F
import torchio as tio

from nnmamba.data.readers.brats import BRATS_LABELS, BRATS_MODALITIES, brats_file, find_brats_cases
from nnmamba.data.cases import CaseFiles
from nnmamba.data.errors import DataError
from nnmamba.data.preprocessing.fingerprint import dataset_fingerprint
from nnmamba.data.preprocessing.preprocess import (
    load_case,
    load_preprocessed,
    prepare_dataset,
    preprocess_subject,
    to_raw_geometry,
)
from nnmamba.data.synthetic.brats import write_synthetic_brats

SHAPE = (32, 32, 24)
SPACING = (1.0, 1.2, 1.5)  # anisotropic, so axis permutations must carry spacing along
MARGIN = 2


@pytest.fixture(scope="module")
def raw_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("raw")
    write_synthetic_brats(root, n_cases=3, shape=SHAPE, spacing=SPACING, seed=11)
    return root


@pytest.fixture(scope="module")
def prepared(raw_root: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out_dir = tmp_path_factory.mktemp("prepared") / "brats"
    dataset = prepare_dataset(find_brats_cases(raw_root), out_dir, BRATS_LABELS, MARGIN, progress=False)
    return out_dir, dataset


def _reference(case: CaseFiles, margin: int) -> dict:
    """Brute-force preprocessing with NiBabel/NumPy: RAS, z-score in the head mask, crop."""
    canonical = [nib.as_closest_canonical(nib.load(p)) for p in case.images.values()]
    data = np.stack([np.asarray(c.dataobj, dtype=np.float64) for c in canonical])
    mask = (data != 0).any(axis=0)
    voxels = np.argwhere(mask)
    start = np.maximum(voxels.min(axis=0) - margin, 0)
    stop = np.minimum(voxels.max(axis=0) + 1 + margin, mask.shape)
    normalised = np.zeros_like(data)
    for channel, values in enumerate(data):
        inside = values[mask]
        normalised[channel][mask] = (inside - inside.mean()) / inside.std(ddof=1)
    box = tuple(slice(a, b) for a, b in zip(start, stop))
    translation = np.eye(4)
    translation[:3, 3] = start
    label = np.asarray(nib.as_closest_canonical(nib.load(case.label)).dataobj)
    return {
        "image": normalised[(slice(None), *box)],
        "mask": mask[box],
        "label": label[box],
        "affine": canonical[0].affine @ translation,
    }


def _snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_layout_and_dataset_json(raw_root: Path, prepared: tuple[Path, dict]) -> None:
    out_dir, returned = prepared
    dataset = json.loads((out_dir / "dataset.json").read_text())
    assert dataset == returned
    assert dataset["channels"] == list(BRATS_MODALITIES)
    assert dataset["labels"] == {str(k): v for k, v in BRATS_LABELS.items()}
    cases = find_brats_cases(raw_root)
    assert sorted(dataset["cases"]) == [c.case_id for c in cases]
    for case in cases:
        entry = dataset["cases"][case.case_id]
        assert entry["image"] == f"images/{case.case_id}.nii.gz"
        assert entry["label"] == f"labels/{case.case_id}.nii.gz"
        assert entry["raw_images"] == {m: str(p.resolve()) for m, p in case.images.items()}
        assert entry["raw_label"] == str(case.label.resolve())
        image, label = nib.load(out_dir / entry["image"]), nib.load(out_dir / entry["label"])
        assert image.get_data_dtype() == np.float32 and label.get_data_dtype() == np.uint8
        raw = nib.load(case.label)
        assert entry["properties"]["raw_shape"] == list(raw.shape)
        assert entry["properties"]["raw_orientation"] == "".join(nib.aff2axcodes(raw.affine))
        subject = load_preprocessed(out_dir, case.case_id)
        assert subject["image"].num_channels == len(BRATS_MODALITIES)
        assert list(subject["image"].spatial_shape) == entry["properties"]["preprocessed_shape"]


def test_matches_brute_force_reference(raw_root: Path, prepared: tuple[Path, dict]) -> None:
    out_dir, dataset = prepared
    orientations = set()
    for case in find_brats_cases(raw_root):
        orientations.add(dataset["cases"][case.case_id]["properties"]["raw_orientation"])
        expected = _reference(case, MARGIN)
        subject = load_preprocessed(out_dir, case.case_id)
        image = subject["image"].data.numpy()
        assert subject["image"].orientation == ("R", "A", "S")
        np.testing.assert_allclose(subject["image"].affine, expected["affine"], atol=1e-4)
        np.testing.assert_array_equal(subject["label"].data[0].numpy(), expected["label"])
        np.testing.assert_allclose(image, expected["image"], atol=1e-4)
        mask = expected["mask"]
        for channel in image:
            assert abs(channel[mask].mean()) < 1e-4
            assert abs(channel[mask].std(ddof=1) - 1.0) < 1e-4
            assert not channel[~mask].any()
    assert orientations == {"LPS", "PIR"}


@pytest.mark.parametrize("index", [0, 1], ids=["LPS", "PIR"])
def test_prediction_maps_back_to_raw_grid_exactly(
    raw_root: Path, prepared: tuple[Path, dict], tmp_path: Path, index: int
) -> None:
    out_dir, dataset = prepared
    case = find_brats_cases(raw_root)[index]
    properties = dataset["cases"][case.case_id]["properties"]
    preprocessed_label = load_preprocessed(out_dir, case.case_id)["label"].data.to(torch.int64)
    raw_label = np.asarray(nib.load(case.label).dataobj)

    back = to_raw_geometry(preprocessed_label, properties, case.images["t1c"])
    np.testing.assert_array_equal(back.data[0].numpy(), raw_label)
    written = tmp_path / "prediction.nii.gz"
    back.save(written)
    ours, theirs = sitk.ReadImage(str(written)), sitk.ReadImage(str(case.images["t1c"]))
    assert ours.GetSize() == theirs.GetSize()
    for getter in ("GetSpacing", "GetOrigin", "GetDirection"):
        np.testing.assert_allclose(getattr(ours, getter)(), getattr(theirs, getter)(), atol=1e-5)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(ours), sitk.GetArrayFromImage(sitk.ReadImage(str(case.label))))

    probabilities = F.one_hot(preprocessed_label[0], len(BRATS_LABELS)).permute(3, 0, 1, 2).float()
    back_probabilities = to_raw_geometry(probabilities, properties, case.images["t1c"])
    assert back_probabilities.data.is_floating_point()
    np.testing.assert_array_equal(back_probabilities.data.argmax(dim=0).numpy(), raw_label)


def test_wrong_prediction_shape_is_rejected(raw_root: Path, prepared: tuple[Path, dict]) -> None:
    out_dir, dataset = prepared
    case = find_brats_cases(raw_root)[0]
    with pytest.raises(ValueError, match="preprocessed shape"):
        to_raw_geometry(torch.zeros(1, 5, 5, 5, dtype=torch.int64), dataset["cases"][case.case_id]["properties"],
                        case.images["t1c"])


def test_unknown_case_in_prepared_dataset(prepared: tuple[Path, dict]) -> None:
    with pytest.raises(DataError, match="case nope: not in prepared dataset"):
        load_preprocessed(prepared[0], "nope")


def test_failing_case_leaves_previous_output_byte_identical(raw_root: Path, tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    write_synthetic_brats(raw, n_cases=3, shape=SHAPE, seed=11)
    out_dir = tmp_path / "out" / "brats"
    prepare_dataset(find_brats_cases(raw), out_dir, BRATS_LABELS, MARGIN, progress=False)
    # Preparing again replaces the output and leaves nothing else beside it.
    prepare_dataset(find_brats_cases(raw), out_dir, BRATS_LABELS, MARGIN + 1, progress=False)
    assert [p.name for p in out_dir.parent.iterdir()] == ["brats"]
    before = _snapshot(out_dir)
    assert json.loads(before["dataset.json"])["cases"]["BraTS-GLI-00000-000"]["properties"]["crop_margin"] == 3

    middle = find_brats_cases(raw)[1]
    bad = brats_file(raw / middle.case_id, "t2w")
    content = bad.read_bytes()
    bad.write_bytes(content[: len(content) // 2])
    with pytest.raises(DataError, match=middle.case_id):
        prepare_dataset(find_brats_cases(raw), out_dir, BRATS_LABELS, MARGIN, progress=False)
    assert [p.name for p in out_dir.parent.iterdir()] == ["brats"]
    assert _snapshot(out_dir) == before

    fresh = tmp_path / "fresh" / "brats"
    with pytest.raises(DataError, match=middle.case_id):
        prepare_dataset(find_brats_cases(raw), fresh, BRATS_LABELS, MARGIN, progress=False)
    assert list(fresh.parent.iterdir()) == []


@pytest.mark.parametrize("value", [0, 7])
def test_a_constant_image_file_is_refused_on_loading(tmp_path: Path, value: int) -> None:
    affine = np.diag([-1.0, -1.0, 1.0, 1.0])
    images = {}
    for index, modality in enumerate(BRATS_MODALITIES):
        images[modality] = tmp_path / f"case-{modality}.nii.gz"
        data = np.full((8, 8, 8), value, np.int16) if index == 1 else np.arange(512, dtype=np.int16).reshape(8, 8, 8)
        nib.save(nib.Nifti1Image(data, affine), images[modality])
    with pytest.raises(DataError) as raised:
        load_case(CaseFiles("case", images, None), BRATS_LABELS)
    assert str(raised.value) == (f"case case: {images['t1n']}: image is constant (all voxels = {float(value)}): "
                                 "nothing to crop or normalise")


def test_an_all_zero_subject_is_rejected() -> None:
    """preprocess_subject takes any subject, not only load_case's, so it keeps its own guard."""
    subject = tio.Subject(image=tio.ScalarImage(tensor=torch.zeros(2, 8, 8, 8), affine=np.eye(4)), case_id="zero")
    with pytest.raises(DataError, match="case zero: every voxel"):
        preprocess_subject(subject, MARGIN)


def test_cases_prepared_in_processes_give_the_same_files_and_errors(raw_root: Path, prepared: tuple[Path, dict],
                                                                   tmp_path: Path) -> None:
    serial_dir, serial = prepared
    parallel_dir = tmp_path / "parallel" / "brats"
    parallel = prepare_dataset(find_brats_cases(raw_root), parallel_dir, BRATS_LABELS, MARGIN, progress=False,
                               workers=2)
    assert parallel == serial
    assert _snapshot(parallel_dir) == _snapshot(serial_dir)
    labels = dict(BRATS_LABELS)
    cases = find_brats_cases(raw_root)
    channels = list(cases[0].images)
    assert dataset_fingerprint(cases, labels, channels, progress=False, workers=2) == dataset_fingerprint(
        cases, labels, channels, progress=False)

    broken = tmp_path / "raw"
    write_synthetic_brats(broken, n_cases=3, shape=SHAPE, seed=11)
    middle = find_brats_cases(broken)[1]
    bad = brats_file(broken / middle.case_id, "t1n")
    bad.write_bytes(bad.read_bytes()[:100])
    before = _snapshot(parallel_dir)
    with pytest.raises(DataError, match=middle.case_id):
        prepare_dataset(find_brats_cases(broken), parallel_dir, BRATS_LABELS, MARGIN, progress=False, workers=2)
    assert _snapshot(parallel_dir) == before
