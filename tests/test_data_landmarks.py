"""Landmarks layout on real files: reader, errors naming the case, synthetic generator, preprocessing geometry."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy.ndimage import map_coordinates

from nnmamba.data.errors import DataError
from nnmamba.data.preprocessing.landmarks import prepare_landmark_dataset
from nnmamba.data.readers.landmarks import LANDMARK_NAMES, find_landmark_cases, read_landmarks
from nnmamba.data.layouts import get_layout
from nnmamba.data.synthetic.fetal import write_synthetic_fetal
from nnmamba.heatmaps import decode_heatmaps, world_to_voxel
from tests.conftest import move_outside_and_link

NAMES = ("A1", "B2")


def _write_image(path: Path, data: np.ndarray, affine: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = nib.Nifti1Image(data, affine)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    nib.save(image, path)


def _write_points(path: Path, points: dict, system: str | None = "RAS") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    content = {"landmarks": points} if system is None else {"coordinate_system": system, "landmarks": points}
    path.write_text(json.dumps(content))


def _case(root: Path, case_id: str, points: dict, system: str | None = "RAS",
          affine: np.ndarray | None = None, data: np.ndarray | None = None) -> None:
    affine = np.diag([2.0, 2.0, 3.0, 1.0]) if affine is None else affine
    data = np.random.default_rng(0).integers(50, 150, (10, 10, 8)).astype(np.int16) if data is None else data
    _write_image(root / "images" / f"{case_id}.nii.gz", data, affine)
    _write_points(root / "landmarks" / f"{case_id}.json", points, system)


def test_reader_lists_cases_and_converts_lps_to_ras(tmp_path: Path) -> None:
    _case(tmp_path, "c2", {"A1": [1, 2, 3], "B2": [4.5, 5, 6], "extra": [0, 0, 0]}, system=None)
    _case(tmp_path, "c1", {"A1": [1, 2, 3], "B2": [-4.5, -5, 6]}, system="LPS")
    cases = find_landmark_cases(tmp_path)
    assert [c.case_id for c in cases] == ["c1", "c2"]
    assert cases[0].images == {"image": tmp_path / "images" / "c1.nii.gz"} and cases[0].label is None
    # LPS x and y point the other way: (1, 2, 3) LPS is (-1, -2, 3) RAS.
    assert read_landmarks(cases[0].points, NAMES, "c1") == {"A1": [-1.0, -2.0, 3.0], "B2": [4.5, 5.0, 6.0]}
    assert read_landmarks(cases[1].points, NAMES, "c2") == {"A1": [1.0, 2.0, 3.0], "B2": [4.5, 5.0, 6.0]}


def test_layout_is_registered_with_the_paper_landmarks() -> None:
    layout = get_layout("landmarks")
    assert list(layout.labels.values()) == ["TCD1", "TCD2", "HDV1", "HDV2", "ADV1", "ADV2"]
    assert layout.channels == ("image",)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ({"coordinate_system": "RAS", "landmarks": {"A1": [1, 2, 3], "B 2": [1, 2, 3]}},
         r"case c7: .*c7\.json lacks landmark\(s\) \['B2'\]; it has \['A1', 'B 2'\]"),
        ({"landmarks": {"A1": [1, 2, 3], "B2": [1, 2]}}, r"case c7: .*landmark B2 is \[1, 2\]"),
        ({"landmarks": {"A1": [1, 2, None], "B2": [1, 2, 3]}}, r"case c7: .*landmark A1 is"),
        ({"coordinate_system": "XYZ", "landmarks": {"A1": [1, 2, 3], "B2": [1, 2, 3]}}, r"case c7: .*'XYZ'"),
        ({"points": {}}, r"case c7: .*no 'landmarks' object"),
    ],
)
def test_bad_points_files_name_the_case_and_the_problem(tmp_path: Path, content: dict, message: str) -> None:
    path = tmp_path / "c7.json"
    path.write_text(json.dumps(content))
    with pytest.raises(DataError, match=message):
        read_landmarks(path, NAMES, "c7")


def test_unreadable_json_and_missing_points_file_name_the_case(tmp_path: Path) -> None:
    broken = tmp_path / "c8.json"
    broken.write_text('{"landmarks": {"A1": [1, 2')
    with pytest.raises(DataError, match=r"case c8: cannot read landmarks file .*c8\.json"):
        read_landmarks(broken, NAMES, "c8")
    _write_image(tmp_path / "root" / "images" / "c9.nii.gz", np.ones((2, 2, 2), np.int16), np.eye(4))
    with pytest.raises(DataError, match=r"case c9: landmarks file missing, expected .*landmarks/c9\.json"):
        find_landmark_cases(tmp_path / "root")


@pytest.mark.parametrize("linked", ["landmarks/c1.json", "images/c1.nii.gz"])
def test_a_file_symlinked_outside_the_root_is_refused(tmp_path: Path, linked: str) -> None:
    root = tmp_path / "root"
    _case(root, "c1", {"A1": [2, 2, 3], "B2": [4, 4, 6]})
    path = root / linked
    outside = move_outside_and_link(path, tmp_path / "elsewhere" / path.name)
    with pytest.raises(DataError) as raised:
        find_landmark_cases(root)
    assert str(raised.value) == (f"case c1: {path} resolves to {outside.resolve()}, "
                                 f"outside the dataset root {root.resolve()}")


def test_point_outside_the_volume_names_case_and_point_and_keeps_earlier_output(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    _case(raw, "good", {"A1": [2, 2, 3], "B2": [10, 10, 10]})
    # Voxels (0..9, 0..9, 0..7) of 2 x 2 x 3 mm: the field of view ends at 19 mm in x.
    _case(raw, "bad", {"A1": [2, 2, 3], "B2": [19.5, 10, 10]})
    out_dir = tmp_path / "prepared"
    out_dir.mkdir()
    (out_dir / "dataset.json").write_text("earlier")
    with pytest.raises(DataError, match=r"case bad: landmark B2 at \[19.5, 10.0, 10.0\] mm \(RAS\) lies outside"):
        prepare_landmark_dataset(find_landmark_cases(raw), out_dir, NAMES, (2.0, 2.0, 2.0), 1, progress=False)
    assert (out_dir / "dataset.json").read_text() == "earlier"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prepared", "raw"]


def test_preprocessing_keeps_world_coordinates(tmp_path: Path) -> None:
    """A bright blob at a known world point, stored P-I-R with anisotropic voxels, is found at that point after
    reorientation, cropping, z-scoring and resampling to 1.5 mm."""
    # Array axes: i -> posterior (-y, 1.2 mm), j -> inferior (-z, 2.5 mm), k -> right (+x, 0.9 mm).
    affine = np.array([[0, 0, 0.9, -20.0], [-1.2, 0, 0, 25.0], [0, -2.5, 0, 30.0], [0, 0, 0, 1.0]])
    shape = (40, 24, 44)
    blob = np.array([3.7, 2.1, 0.4])
    index = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1)
    world = index @ affine[:3, :3].T + affine[:3, 3]
    data = (1000 * np.exp(-np.sum((world - blob) ** 2, axis=-1) / (2 * 5.0**2)) + 50).astype(np.float32)
    edge = [5.0, 5.0, 5.0]  # a second point, to have two landmarks
    _case(tmp_path / "raw", "blob", {"A1": blob.tolist(), "B2": edge}, affine=affine, data=data)
    out_dir = tmp_path / "prepared"
    dataset = prepare_landmark_dataset(find_landmark_cases(tmp_path / "raw"), out_dir, NAMES, (1.5, 1.5, 1.5), 2,
                                       progress=False)
    entry = dataset["cases"]["blob"]
    assert entry["landmarks_mm"] == {"A1": pytest.approx(blob.tolist()), "B2": edge}
    assert json.loads((out_dir / "dataset.json").read_text())["landmarks"] == list(NAMES)
    image = nib.load(out_dir / entry["image"])
    assert nib.aff2axcodes(image.affine) == ("R", "A", "S")
    assert np.linalg.norm(image.affine[:3, :3], axis=0) == pytest.approx([1.5, 1.5, 1.5])
    assert np.allclose(entry["properties"]["preprocessed_affine"], image.affine, atol=1e-4)
    found = decode_heatmaps(np.asarray(image.dataobj, dtype=np.float32)[None], image.affine)[0]
    assert np.linalg.norm(found - blob) < 0.2


def test_synthetic_cases_are_readable_and_landmarks_sit_on_the_anatomy(tmp_path: Path) -> None:
    """Each point is the end of a dark structure (cerebellar hemisphere, vermis): 2 mm inward, towards its
    partner point, the T2 image is darker than 2 mm outward."""
    ids = write_synthetic_fetal(tmp_path, n_cases=4, shape=(64, 64, 56), spacing=(1.0, 1.0, 1.0), seed=3)
    cases = find_landmark_cases(tmp_path)
    assert [c.case_id for c in cases] == ids
    systems = [json.loads(c.points.read_text())["coordinate_system"] for c in cases]
    assert systems == ["RAS", "LPS", "RAS", "LPS"]
    partner = {"TCD1": "TCD2", "TCD2": "TCD1", "HDV1": "HDV2", "HDV2": "HDV1", "ADV1": "ADV2", "ADV2": "ADV1"}
    for case in cases:
        image = nib.load(case.images["image"])
        data = np.asarray(image.dataobj, dtype=np.float64)
        points = read_landmarks(case.points, LANDMARK_NAMES, case.case_id)
        for name, point in points.items():
            inward = np.subtract(points[partner[name]], point)
            inward /= np.linalg.norm(inward)
            samples = world_to_voxel(image.affine, np.array([point + 2 * inward, point - 2 * inward]))
            inside, outside = map_coordinates(data, samples.T, order=1)
            assert inside < 0.85 * outside, (case.case_id, name, inside, outside)
