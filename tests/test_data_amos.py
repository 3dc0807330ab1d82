"""AMOS 2022 reader and the synthetic abdominal CT/MR generator, on real files on disk."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from nnmamba.data.synthetic.abdomen_phantom import AMOS_LABELS
from nnmamba.data.readers.amos import amos_modality, read_amos_dataset
from nnmamba.data.errors import DataError
from nnmamba.data.layouts import get_layout
from nnmamba.data.synthetic.amos import write_synthetic_amos
from tests.conftest import move_outside_and_link

CASES = {"CT": {"imagesTr": 3, "imagesVa": 1, "imagesTs": 1}, "MR": {"imagesTr": 2, "imagesVa": 1, "imagesTs": 1}}
FOV = (120.0, 96.0, 96.0)
SPACING = {"CT": (3.0, 3.0, 7.5), "MR": (3.5, 3.5, 8.0)}
ALL_FOLDERS = ("imagesTr", "imagesVa", "imagesTs")


@pytest.fixture(scope="module")
def amos_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("amos")
    write_synthetic_amos(root, CASES, field_of_view_mm=FOV, modality_spacing=SPACING, seed=2)
    return root


def _canonical(path: Path) -> tuple[np.ndarray, tuple[float, ...]]:
    image = nib.as_closest_canonical(nib.load(path))
    return np.asarray(image.dataobj), tuple(float(z) for z in image.header.get_zooms())


def test_case_ids_select_the_modality() -> None:
    assert [amos_modality(c) for c in ("amos_0001", "amos_0499", "amos_0500", "amos_0600")] == ["CT", "CT", "MR", "MR"]
    with pytest.raises(DataError, match="not an AMOS case id"):
        amos_modality("BraTS-GLI-00000-000")


def test_reads_one_modality_from_the_chosen_folders(amos_root: Path) -> None:
    ct = read_amos_dataset(amos_root, "CT", ALL_FOLDERS)
    assert [(c.case_id, c.subset, c.label is not None) for c in ct.cases] == [
        ("amos_0001", "train", True), ("amos_0002", "train", True), ("amos_0003", "train", True),
        ("amos_0004", "val", True), ("amos_0005", "test", False)]
    assert ct.channels == ("CT",) and ct.labels == AMOS_LABELS
    assert ct.cases[3].images == {"CT": amos_root / "imagesVa/amos_0004.nii.gz"}
    assert ct.cases[3].label == amos_root / "labelsVa/amos_0004.nii.gz"
    mr = get_layout("amos22").read(amos_root, modality="mr")
    assert [c.case_id for c in mr.cases] == ["amos_0500", "amos_0501", "amos_0502"] and mr.channels == ("MR",)


def test_synthetic_ct_and_mr_look_like_amos(amos_root: Path) -> None:
    spacings = set()
    for case in read_amos_dataset(amos_root, "CT").cases:
        image, spacing = _canonical(case.images["CT"])
        labels, _ = _canonical(case.label)
        spacings.add(spacing)
        assert nib.load(case.images["CT"]).get_data_dtype() == np.int16
        assert image.min() <= -1000 and np.median(image[labels == 0]) < -20  # air and fat outside organs
        liver, aorta = np.median(image[labels == 6]), np.median(image[labels == 8])
        assert 80 < liver < 130 and aorta > 200  # enhanced liver, arterial-phase aorta
        # The liver lies on the patient's right (+x in RAS), the spleen on the left.
        x = np.arange(image.shape[0])[:, None, None]
        assert (x * (labels == 6)).sum() / (labels == 6).sum() > (x * (labels == 1)).sum() / (labels == 1).sum()
        assert spacing[2] > 1.5 * spacing[0] and spacing[0] == spacing[1]
    assert len(spacings) > 1  # every case has its own spacing
    present = set()
    for case in read_amos_dataset(amos_root, "MR").cases:
        image, _ = _canonical(case.images["MR"])
        labels, _ = _canonical(case.label)
        assert image.dtype == np.float32 and image.min() >= 0
        assert np.median(image[labels == 6]) < np.median(image[(labels == 0) & (image > 600)])  # fat brighter
        present |= set(np.unique(labels).tolist())
    assert present == set(AMOS_LABELS)
    ct_cases = read_amos_dataset(amos_root, "CT").cases
    orientations = {"".join(nib.aff2axcodes(nib.load(c.label).affine)) for c in ct_cases}
    assert orientations == {"RAS", "LPS"}
    listing = json.loads((amos_root / "dataset.json").read_text())
    assert len(listing["training"]) == 5 and len(listing["test"]) == 2 and "label" not in listing["test"][0]


def test_modality_is_required(amos_root: Path) -> None:
    with pytest.raises(DataError, match=r"choose a modality, one of \['CT', 'MR'\]"):
        read_amos_dataset(amos_root)
    with pytest.raises(DataError, match="choose a modality"):
        get_layout("amos22").read(amos_root, modality="PET")


def test_missing_label_bad_name_and_no_cases(amos_root: Path, tmp_path: Path) -> None:
    root = Path(shutil.copytree(amos_root, tmp_path / "amos"))
    (root / "labelsVa/amos_0004.nii.gz").unlink()
    with pytest.raises(DataError, match="case amos_0004: label missing, expected file .*labelsVa/amos_0004.nii.gz"):
        read_amos_dataset(root, "CT")
    shutil.copy(root / "imagesTr/amos_0001.nii.gz", root / "imagesTr/scan1.nii.gz")
    with pytest.raises(DataError, match="scan1.nii.gz: AMOS image files are named amos_XXXX.nii.gz"):
        read_amos_dataset(root, "MR")
    with pytest.raises(DataError, match=r"no MR cases in \['imagesTs'\]"):
        read_amos_dataset(_only_ct_test(amos_root, tmp_path), "MR", ("imagesTs",))
    with pytest.raises(DataError, match="unknown image folder 'imagesVal'"):
        read_amos_dataset(amos_root, "CT", ("imagesVal",))


def test_a_label_symlinked_outside_the_root_is_refused(amos_root: Path, tmp_path: Path) -> None:
    root = Path(shutil.copytree(amos_root, tmp_path / "amos"))
    label = root / "labelsTr/amos_0001.nii.gz"
    outside = move_outside_and_link(label, tmp_path / "elsewhere.nii.gz")
    with pytest.raises(DataError) as raised:
        read_amos_dataset(root, "CT")
    assert str(raised.value) == (f"case amos_0001: {label} resolves to {outside.resolve()}, "
                                 f"outside the dataset root {root.resolve()}")


def _only_ct_test(amos_root: Path, tmp_path: Path) -> Path:
    root = tmp_path / "ct_only"
    (root / "imagesTs").mkdir(parents=True)
    shutil.copy(amos_root / "dataset.json", root)
    shutil.copy(amos_root / "imagesTs/amos_0005.nii.gz", root / "imagesTs")
    return root
