"""Planned preprocessing (CT clipping + dataset z-score, per-image z-score, resampling) and its way back to raw."""

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

from nnmamba.data.cases import CaseFiles
from nnmamba.data.readers.nnunet import read_nnunet_dataset
from nnmamba.data.preprocessing.plan import ChannelNormalization, Preprocessing
from nnmamba.data.preprocessing.preprocess import load_case, load_preprocessed, prepare_dataset, preprocess_subject, to_raw_geometry
from nnmamba.data.synthetic.nnunet import write_synthetic_nnunet
from nnmamba.metrics import dice

LABELS = {0: "background", 1: "liver", 2: "spleen", 3: "kidney"}
SPACING = (2.4, 2.4, 6.5)
CT_RULE = ChannelNormalization("ct", clip=(-20.0, 250.0), mean=100.0, std=40.0)
MARGIN = 1


@pytest.fixture(scope="module")
def raw(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("raw")
    write_synthetic_nnunet(root, n_train=3, field_of_view_mm=(96.0, 80.0, 78.0), spacing=SPACING, file_ending=".nrrd",
                           label_dtype="int32", seed=8)
    return root


def _canonical_arrays(case: CaseFiles) -> tuple[list[np.ndarray], np.ndarray]:
    """Raw channels and labels in canonical RAS order via SimpleITK -> NumPy -> NiBabel orientation."""
    def load(path: Path) -> np.ndarray:
        image = sitk.ReadImage(str(path))
        array = sitk.GetArrayFromImage(image).transpose(2, 1, 0).astype(np.float64)  # to (i, j, k)
        lps_direction = np.asarray(image.GetDirection()).reshape(3, 3)
        affine = np.eye(4)
        affine[:3, :3] = np.diag([-1.0, -1.0, 1.0]) @ lps_direction @ np.diag(image.GetSpacing())
        ornt = nib.orientations.io_orientation(affine)
        return nib.orientations.apply_orientation(array, ornt)
    return [load(p) for p in case.images.values()], load(case.label)


def test_ct_and_zscore_channels_match_numpy(raw: Path) -> None:
    case = read_nnunet_dataset(raw).cases[2]  # stored with permuted axes (PIR)
    preprocessing = Preprocessing((CT_RULE, ChannelNormalization("zscore")))
    subject, properties = preprocess_subject(load_case(case, LABELS), MARGIN, preprocessing)
    (ct, mr), labels = _canonical_arrays(case)
    assert not properties["resampled"] and subject["image"].orientation == ("R", "A", "S")
    # CT and MR are nonzero everywhere (air is -1000 HU, MR has background noise): nothing is cropped.
    assert list(subject["image"].spatial_shape) == list(ct.shape)
    np.testing.assert_allclose(subject["image"].data[0].numpy(), (np.clip(ct, -20, 250) - 100) / 40, atol=1e-5)
    np.testing.assert_allclose(subject["image"].data[1].numpy(), (mr - mr.mean()) / mr.std(ddof=1), atol=1e-4)
    np.testing.assert_array_equal(subject["label"].data[0].numpy(), labels)


def test_resampling_to_the_target_spacing_and_back(raw: Path, tmp_path: Path) -> None:
    target = (1.6, 1.6, 4.0)
    preprocessing = Preprocessing((CT_RULE, ChannelNormalization("zscore")), target_spacing=target)
    cases = read_nnunet_dataset(raw).cases
    index = prepare_dataset(cases, tmp_path / "prepared", LABELS, MARGIN, progress=False, preprocessing=preprocessing)
    for case in cases:
        entry = index["cases"][case.case_id]
        properties = entry["properties"]
        assert properties["resampled"] and properties["preprocessed_spacing"] == pytest.approx(target)
        subject = load_preprocessed(tmp_path / "prepared", case.case_id)
        assert subject["image"].spacing == pytest.approx(target)
        labels = subject["label"].data[0].to(torch.int64)
        probabilities = F.one_hot(labels, len(LABELS)).permute(3, 0, 1, 2).float()
        back = to_raw_geometry(probabilities, properties, case.label)
        truth = tio.LabelMap(case.label)
        assert back.spatial_shape == truth.spatial_shape
        np.testing.assert_allclose(back.affine, truth.affine, atol=1e-4)
        predicted = back.data.argmax(dim=0).numpy()
        for value in (1, 2, 3):  # big organs survive two interpolations almost untouched
            assert dice(predicted == value, truth.data[0].numpy() == value) > 0.9
    assert json.loads((tmp_path / "prepared/dataset.json").read_text())["cases"][cases[0].case_id]["subset"] == "train"


def test_border_voxels_keep_their_class_after_resampling(tmp_path: Path) -> None:
    """An organ touching the image border is mapped back to the border (no zero-extrapolated rim)."""
    shape, spacing = (20, 16, 9), (2.0, 2.0, 5.0)
    labels = np.zeros(shape, dtype=np.uint8)
    labels[:, :, :] = 1  # one class fills the whole field of view
    labels[5:9, 5:9, 3:6] = 2
    affine = np.diag([*spacing, 1.0])
    nib.save(nib.Nifti1Image(labels, affine), tmp_path / "label.nii.gz")
    image = np.where(labels == 2, 300, 60).astype(np.int16)
    nib.save(nib.Nifti1Image(image, affine), tmp_path / "image.nii.gz")
    case = CaseFiles("border", {"CT": tmp_path / "image.nii.gz"}, tmp_path / "label.nii.gz")
    preprocessing = Preprocessing((CT_RULE,), target_spacing=(2.7, 2.7, 6.5))
    subject, properties = preprocess_subject(load_case(case, {0: "bg", 1: "a", 2: "b"}), 0, preprocessing)
    probabilities = F.one_hot(subject["label"].data[0].long(), 3).permute(3, 0, 1, 2).float()
    back = to_raw_geometry(probabilities, properties, case.label).data.argmax(dim=0).numpy()
    assert (back[[0, -1]] != 0).all() and (back[:, [0, -1]] != 0).all() and (back[:, :, [0, -1]] != 0).all()
