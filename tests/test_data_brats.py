"""BraTS 2023 reader, synthetic generator and case validation, on real files on disk."""

from __future__ import annotations

import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from nnmamba.data.readers.brats import BRATS_LABELS, BRATS_MODALITIES, brats_file, find_brats_cases
from nnmamba.data.errors import DataError
from nnmamba.data.preprocessing.preprocess import load_case
from nnmamba.data.synthetic.brats import write_synthetic_brats
from tests.conftest import move_outside_and_link

SHAPE = (28, 28, 22)


@pytest.fixture
def raw_root(tmp_path: Path) -> Path:
    root = tmp_path / "raw"
    write_synthetic_brats(root, n_cases=2, shape=SHAPE, seed=3)
    return root


def _read(path: Path) -> tuple[np.ndarray, np.ndarray]:
    image = nib.load(path)
    return np.asarray(image.dataobj), image.affine


def _rewrite(path: Path, data: np.ndarray, affine: np.ndarray) -> None:
    nib.save(nib.Nifti1Image(data, affine), path)


def _case_dir(root: Path, index: int) -> Path:
    return sorted(root.iterdir())[index]


def test_finds_every_case_sorted_with_modalities_in_order(raw_root: Path) -> None:
    cases = find_brats_cases(raw_root)
    assert [c.case_id for c in cases] == sorted(p.name for p in raw_root.iterdir())
    for case in cases:
        assert tuple(case.images) == BRATS_MODALITIES
        for modality, path in case.images.items():
            assert path == raw_root / case.case_id / f"{case.case_id}-{modality}.nii.gz"
            assert path.is_file()
        assert case.label == raw_root / case.case_id / f"{case.case_id}-seg.nii.gz"


def test_synthetic_cases_look_like_brats(raw_root: Path) -> None:
    cases = find_brats_cases(raw_root)
    expected_codes = [("L", "P", "S"), ("P", "I", "R")]
    for case, codes in zip(cases, expected_codes):
        seg, seg_affine = _read(case.label)
        assert seg.dtype == np.uint8
        assert set(np.unique(seg)) == set(BRATS_LABELS)
        assert nib.aff2axcodes(seg_affine) == codes
        images = {m: _read(p)[0] for m, p in case.images.items()}
        assert images["t1c"].dtype == np.int16 and images["t2w"].dtype == np.float32
        head = np.stack([img != 0 for img in images.values()])
        # Background is exactly 0 in every modality on the same voxels, and the
        # head does not touch the volume border (there is something to crop).
        assert (head == head[0]).all()
        head = head[0]
        assert head.any() and not head[0].any() and not head[-1].any()
        assert not seg[~head].any()
        # Nested sub-regions: NCR nearest the tumour centre, then ET, then ED.
        coords = np.argwhere(seg > 0)
        centre = coords[seg[seg > 0] == 1].mean(axis=0)
        mean_distance = {
            label: np.linalg.norm(np.argwhere(seg == label) - centre, axis=1).mean() for label in (1, 3, 2)
        }
        assert mean_distance[1] < mean_distance[3] < mean_distance[2]
        # Modality contrast: ET bright on t1c, edema bright on FLAIR/T2, tumour dark on t1n.
        normal = head & (seg == 0)
        t1c, t2f, t2w, t1n = (images[m].astype(float) for m in ("t1c", "t2f", "t2w", "t1n"))
        assert t1c[seg == 3].mean() > 1.3 * max(t1c[seg == 2].mean(), t1c[normal].mean())
        assert t2f[seg == 2].mean() > 1.3 * t2f[normal].mean()
        assert t2w[seg == 2].mean() > t2w[normal].mean()
        assert t1n[seg > 0].mean() < t1n[normal].mean()


def test_synthetic_generation_is_seeded(tmp_path: Path) -> None:
    first = write_synthetic_brats(tmp_path / "a", 2, shape=SHAPE, seed=5)
    again = write_synthetic_brats(tmp_path / "b", 2, shape=SHAPE, seed=5)
    other = write_synthetic_brats(tmp_path / "c", 2, shape=SHAPE, seed=6)
    assert first == again == other
    for case_id in first:
        same = [_read(brats_file(tmp_path / r / case_id, "t1c"))[0] for r in ("a", "b", "c")]
        assert np.array_equal(same[0], same[1])
        assert not np.array_equal(same[0], same[2])


def test_parallel_generation_writes_the_same_cases(tmp_path: Path) -> None:
    serial = write_synthetic_brats(tmp_path / "serial", 3, shape=SHAPE, seed=5)
    parallel = write_synthetic_brats(tmp_path / "parallel", 3, shape=SHAPE, seed=5, workers=2)
    assert serial == parallel
    for case_id in serial:
        for modality in ("t1c", "t2f", "seg"):
            images = [_read(brats_file(tmp_path / r / case_id, modality))[0] for r in ("serial", "parallel")]
            assert np.array_equal(images[0], images[1])


def test_load_case_stacks_channels_in_order(raw_root: Path) -> None:
    case = find_brats_cases(raw_root)[1]
    subject = load_case(case, BRATS_LABELS)
    assert subject["image"].num_channels == len(BRATS_MODALITIES)
    for channel, path in zip(subject["image"].data, case.images.values()):
        data, affine = _read(path)
        np.testing.assert_array_equal(channel.numpy(), data.astype(np.float32))
        np.testing.assert_allclose(subject["image"].affine, affine, atol=1e-5)
    np.testing.assert_array_equal(subject["label"].data[0].numpy(), _read(case.label)[0])


def test_missing_root_and_empty_root(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError, match=re.escape(str(missing))):
        find_brats_cases(missing)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="no case folders"):
        find_brats_cases(empty)


def test_missing_modality_names_case_and_modality(raw_root: Path) -> None:
    case_dir = _case_dir(raw_root, 1)
    brats_file(case_dir, "t2w").unlink()
    with pytest.raises(DataError, match=rf"case {case_dir.name}: modality t2w missing"):
        find_brats_cases(raw_root)


def test_missing_seg_is_an_error_only_when_labels_are_required(raw_root: Path) -> None:
    case_dir = _case_dir(raw_root, 0)
    brats_file(case_dir, "seg").unlink()
    with pytest.raises(DataError, match=rf"case {case_dir.name}: segmentation missing"):
        find_brats_cases(raw_root)
    cases = find_brats_cases(raw_root, require_labels=False)
    assert cases[0].label is None and cases[1].label is not None


def _load_expecting_error(root: Path, index: int, bad_file: Path, problem: str) -> None:
    case = find_brats_cases(root)[index]
    with pytest.raises(DataError) as raised:
        load_case(case, BRATS_LABELS)
    message = str(raised.value)
    assert case.case_id in message and str(bad_file) in message
    assert re.search(problem, message), message


def test_truncated_gzip_is_named(raw_root: Path) -> None:
    path = brats_file(_case_dir(raw_root, 1), "t1n")
    content = path.read_bytes()
    path.write_bytes(content[: len(content) // 2])
    _load_expecting_error(raw_root, 1, path, "cannot read")


def test_garbage_file_is_named(raw_root: Path) -> None:
    path = brats_file(_case_dir(raw_root, 0), "t2f")
    path.write_bytes(b"this is not an image\n" * 50)
    _load_expecting_error(raw_root, 0, path, "cannot read")


def test_modalities_of_different_shape(raw_root: Path) -> None:
    path = brats_file(_case_dir(raw_root, 0), "t2f")
    data, affine = _read(path)
    _rewrite(path, data[:-2], affine)
    _load_expecting_error(raw_root, 0, path, "shape")


def test_modalities_of_different_geometry(raw_root: Path) -> None:
    path = brats_file(_case_dir(raw_root, 1), "t1c")
    data, affine = _read(path)
    shifted = affine.copy()
    shifted[:3, 3] += 2.0
    _rewrite(path, data, shifted)
    # t1c is the reference channel, so every other file is reported against it.
    _load_expecting_error(raw_root, 1, path, "geometry")


def test_label_geometry_differs_from_image(raw_root: Path) -> None:
    path = brats_file(_case_dir(raw_root, 0), "seg")
    data, affine = _read(path)
    _rewrite(path, data, np.diag([2.0, 2.0, 2.0, 1.0]) @ affine)
    _load_expecting_error(raw_root, 0, path, "geometry")


def test_label_value_outside_the_label_set(raw_root: Path) -> None:
    path = brats_file(_case_dir(raw_root, 1), "seg")
    data, affine = _read(path)
    data = data.copy()
    data[3, 3, 3] = 4
    _rewrite(path, data, affine)
    _load_expecting_error(raw_root, 1, path, r"values \[4\] outside")


def test_nan_voxel_is_named(raw_root: Path) -> None:
    path = brats_file(_case_dir(raw_root, 0), "t2w")
    data, affine = _read(path)
    data = data.astype(np.float32)
    data[10, 10, 10] = np.nan
    _rewrite(path, data, affine)
    _load_expecting_error(raw_root, 0, path, "1 NaN/inf")


def test_a_file_or_case_folder_symlinked_outside_the_root_is_refused(raw_root: Path, tmp_path: Path) -> None:
    root = raw_root.resolve()
    path = brats_file(_case_dir(raw_root, 0), "t2f")
    outside = move_outside_and_link(path, tmp_path / "elsewhere" / path.name)
    with pytest.raises(DataError) as raised:
        find_brats_cases(raw_root)
    assert str(raised.value) == (f"case {path.parent.name}: {path} resolves to {outside.resolve()}, "
                                 f"outside the dataset root {root}")
    path.unlink()
    outside.rename(path)
    case_dir = _case_dir(raw_root, 1)
    moved = move_outside_and_link(case_dir, tmp_path / "elsewhere" / case_dir.name)
    with pytest.raises(DataError, match=rf"case {case_dir.name}: .* resolves to {re.escape(str(moved.resolve()))}/"):
        find_brats_cases(raw_root)


@pytest.mark.parametrize("value", [0, 120])
def test_a_constant_modality_is_named(raw_root: Path, value: int) -> None:
    path = brats_file(_case_dir(raw_root, 1), "t1n")
    data, affine = _read(path)
    _rewrite(path, np.full_like(data, value), affine)
    _load_expecting_error(raw_root, 1, path, rf"image is constant \(all voxels = {float(value)}\)")
