"""ADNI layout: the manifest reader, the synthetic generator and whole-volume preprocessing, on real files."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from nnmamba.data.readers.adni import find_adni_cases
from nnmamba.data.errors import DataError
from nnmamba.data.preprocessing.preprocess import load_preprocessed
from nnmamba.data.synthetic.adni import (
    HIPPOCAMPUS_CENTRE,
    HIPPOCAMPUS_SEMI,
    VENTRICLE_CENTRE,
    VENTRICLE_SEMI,
    write_synthetic_adni,
)
from nnmamba.data.preprocessing.whole_volume import prepare_classification_dataset

SHAPE, SPACING = (48, 48, 40), (1.0, 1.0, 1.2)
SUBJECTS = {"NC": 6, "AD": 3, "sMCI": 3, "pMCI": 3}
# Between CSF (200) and grey matter (550) in the generator's T1 units, robust to its bias field.
DARK = 380


@pytest.fixture(scope="module")
def adni_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("adni")
    write_synthetic_adni(root, SUBJECTS, second_visit_fraction=0.5, shape=SHAPE, spacing=SPACING, seed=0)
    return root


def manifest_rows(root: Path) -> list[dict]:
    with (root / "manifest.csv").open() as handle:
        return list(csv.DictReader(handle))


def write_manifest(root: Path, rows: list[dict], columns: list[str]) -> Path:
    with (root / "manifest.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return root


def test_reader_returns_one_case_per_row_with_subject_and_diagnosis(adni_root):
    rows = manifest_rows(adni_root)
    cases = find_adni_cases(adni_root)
    assert [c.case_id for c in cases] == sorted(f"{r['subject']}_{r['visit']}" for r in rows)
    by_id = {c.case_id: c for c in cases}
    for row in rows:
        case = by_id[f"{row['subject']}_{row['visit']}"]
        assert (case.subject, case.class_name, case.label) == (row["subject"], row["diagnosis"], None)
        assert case.images["t1"] == adni_root / row["image"] and case.images["t1"].is_file()
    assert {c.class_name for c in cases} == set(SUBJECTS)
    assert len({c.subject for c in cases}) == sum(SUBJECTS.values()) < len(cases)  # some second visits
    assert [c.case_id for c in find_adni_cases(adni_root / "manifest.csv")] == [c.case_id for c in cases]


def test_without_a_visit_column_the_subject_is_the_case(adni_root, tmp_path):
    rows = manifest_rows(adni_root)[:2]
    for row in rows:
        (tmp_path / "scans").mkdir(exist_ok=True)
        (tmp_path / "scans" / Path(row["image"]).name).write_bytes((adni_root / row["image"]).read_bytes())
    write_manifest(tmp_path, [{"subject": f"S{i}", "image": f"scans/{Path(r['image']).name}", "diagnosis": "AD"}
                              for i, r in enumerate(rows)], ["subject", "image", "diagnosis"])
    assert [(c.case_id, c.subject) for c in find_adni_cases(tmp_path)] == [("S0", "S0"), ("S1", "S1")]


BAD_MANIFESTS = {
    "missing file": ([("S1", "bl", "images/a.nii.gz", "NC"), ("S2", "bl", "images/nope.nii.gz", "AD")],
                     r"line 3 \(subject S2\): image images/nope.nii.gz not found"),
    "unknown diagnosis": ([("S1", "bl", "images/a.nii.gz", "MCI")],
                          r"line 2 \(subject S1\): unknown diagnosis 'MCI'"),
    "duplicate rows": ([("S1", "bl", "images/a.nii.gz", "NC"), ("S1", "bl", "images/b.nii.gz", "NC")],
                       r"lines 2 and 3: case S1_bl appears twice"),
    "one image twice": ([("S1", "bl", "images/a.nii.gz", "NC"), ("S2", "bl", "images/a.nii.gz", "AD")],
                        r"lines 2 and 3: both rows point to image"),
    "empty cell": ([("S1", "bl", "", "NC")], r"line 2: empty image"),
    "no rows": ([], r"no rows"),
}


@pytest.mark.parametrize("problem", BAD_MANIFESTS)
def test_bad_manifests_name_the_line_and_the_problem(adni_root, tmp_path, problem):
    (tmp_path / "images").mkdir()
    source = adni_root / manifest_rows(adni_root)[0]["image"]
    for name in ("a.nii.gz", "b.nii.gz"):
        (tmp_path / "images" / name).write_bytes(source.read_bytes())
    rows, message = BAD_MANIFESTS[problem]
    columns = ["subject", "visit", "image", "diagnosis"]
    write_manifest(tmp_path, [dict(zip(columns, row)) for row in rows], columns)
    with pytest.raises(DataError, match=message):
        find_adni_cases(tmp_path)


@pytest.mark.parametrize("route", ["dot-dot", "absolute", "symlink"])
def test_an_image_outside_the_manifest_folder_is_refused(adni_root, tmp_path, route):
    root, outside = tmp_path / "root", tmp_path / "elsewhere.nii.gz"
    (root / "images").mkdir(parents=True)
    outside.write_bytes((adni_root / manifest_rows(adni_root)[0]["image"]).read_bytes())
    (root / "images" / "link.nii.gz").symlink_to(outside)
    image = {"dot-dot": "../elsewhere.nii.gz", "absolute": str(outside), "symlink": "images/link.nii.gz"}[route]
    columns = ["subject", "image", "diagnosis"]
    write_manifest(root, [{"subject": "S1", "image": image, "diagnosis": "AD"}], columns)
    with pytest.raises(DataError) as raised:
        find_adni_cases(root)
    assert str(raised.value) == (f"{root / 'manifest.csv'} line 2 (subject S1): {root / image} resolves to "
                                 f"{outside.resolve()}, outside the dataset root {root.resolve()}")


def test_a_manifest_saved_with_a_byte_order_mark_reads(adni_root, tmp_path):
    manifest = adni_root / "manifest.csv"
    (adni_root / "bom.csv").write_bytes(b"\xef\xbb\xbf" + manifest.read_bytes())
    assert find_adni_cases(adni_root / "bom.csv") == find_adni_cases(manifest)


def test_missing_manifest_or_column_is_named(tmp_path):
    with pytest.raises(DataError, match="manifest.csv does not exist"):
        find_adni_cases(tmp_path)
    write_manifest(tmp_path, [{"subject": "S1", "image": "x.nii.gz"}], ["subject", "image"])
    with pytest.raises(DataError, match=r"missing column\(s\) \['diagnosis'\]"):
        find_adni_cases(tmp_path)


def _dark_voxels(volume: np.ndarray, spacing, centre_fraction: np.ndarray, semi_fraction: np.ndarray,
                 side: float, scale: float, dark: float = DARK) -> int:
    """CSF-dark voxels inside an ellipsoid placed like the generator's structures.

    ``volume`` is a canonical (RAS) array centred on the head, ``spacing`` its voxel size; the
    brain's size comes from the generator's field of view (SHAPE x SPACING).
    """
    mm = np.meshgrid(*[(np.arange(n) - (n - 1) / 2) * s for n, s in zip(volume.shape, spacing)], indexing="ij")
    brain_semi = 0.82 * 0.42 * np.asarray(SHAPE) * np.asarray(SPACING)
    centre = brain_semi * centre_fraction * np.array([side, 1.0, 1.0])
    semi = brain_semi * semi_fraction * scale
    inside = sum(((axis - c) / s) ** 2 for axis, c, s in zip(mm, centre, semi)) < 1.0
    return int(((volume < dark) & (volume != 0) & inside).sum())


def test_synthetic_classes_need_both_distant_findings(adni_root):
    """Positive classes have left hippocampal atrophy AND right ventricle enlargement; negative ones
    have at most one, and the confounders (exactly one finding) do occur."""
    findings = {}
    for case in find_adni_cases(adni_root):
        volume = nib.as_closest_canonical(nib.load(case.images["t1"])).get_fdata()
        # Left vs right of the same scan, so anatomy and bias field cancel: CSF where the left hippocampus
        # was (atrophy), CSF filling a box twice the right ventricle's healthy size (enlargement).
        atrophy = (_dark_voxels(volume, SPACING, HIPPOCAMPUS_CENTRE, HIPPOCAMPUS_SEMI, -1, 1.0)
                   > _dark_voxels(volume, SPACING, HIPPOCAMPUS_CENTRE, HIPPOCAMPUS_SEMI, +1, 1.0) + 50)
        enlargement = (_dark_voxels(volume, SPACING, VENTRICLE_CENTRE, VENTRICLE_SEMI, +1, 1.8)
                       > 2 * _dark_voxels(volume, SPACING, VENTRICLE_CENTRE, VENTRICLE_SEMI, -1, 1.8))
        findings[case.case_id] = (case.class_name, atrophy, enlargement)
    for case_id, (diagnosis, atrophy, enlargement) in findings.items():
        assert (atrophy and enlargement) == (diagnosis in ("AD", "pMCI")), (case_id, diagnosis, atrophy, enlargement)
    negatives = [(a, e) for d, a, e in findings.values() if d in ("NC", "sMCI")]
    assert (True, False) in negatives and (False, True) in negatives


def test_preprocessing_gives_fixed_shape_spacing_zscore_and_ras(adni_root, tmp_path):
    cases = find_adni_cases(adni_root)
    index = prepare_classification_dataset(cases, tmp_path / "out", ["NC", "AD"], (1.5, 1.5, 1.5), (32, 32, 32),
                                           progress=False)
    assert index["labels"] == {"0": "NC", "1": "AD"}
    expected = {c.case_id: c for c in cases if c.class_name in ("NC", "AD")}
    assert sorted(index["cases"]) == sorted(expected)
    saved = json.loads((tmp_path / "out" / "dataset.json").read_text())
    assert saved == json.loads(json.dumps(index))
    orientations = set()
    for case_id, entry in index["cases"].items():
        assert entry["class_name"] == expected[case_id].class_name
        assert entry["class_index"] == ["NC", "AD"].index(entry["class_name"])
        assert entry["subject"] == expected[case_id].subject
        orientations.add(entry["properties"]["raw_orientation"])
        image = load_preprocessed(tmp_path / "out", case_id)["image"]
        assert image.spatial_shape == (32, 32, 32) and image.spacing == pytest.approx((1.5, 1.5, 1.5))
        assert image.orientation == ("R", "A", "S")
        head = image.data[0] != 0
        assert float(image.data[0][head].mean()) == pytest.approx(0, abs=1e-4)
        assert float(image.data[0][head].std()) == pytest.approx(1, abs=1e-2)
        centre = np.argwhere(head.numpy()).mean(axis=0)
        assert np.abs(centre - 15.5).max() < 2  # cropped/padded around the head
    assert orientations == {"LPS", "PIR"}  # both stored orientations went through canonicalisation


def test_preprocessing_keeps_left_and_right(adni_root, tmp_path):
    """AD scans show their enlarged ventricle on the RIGHT and their atrophy on the LEFT after
    preprocessing (RAS), whichever orientation they were stored in."""
    index = prepare_classification_dataset(find_adni_cases(adni_root), tmp_path / "out", ["NC", "AD"],
                                           (1.5, 1.5, 1.5), (32, 32, 32), progress=False)
    orientations = set()
    for case_id, entry in index["cases"].items():
        if entry["class_name"] != "AD":
            continue
        volume = load_preprocessed(tmp_path / "out", case_id)["image"].data[0].numpy()
        ventricles = [_dark_voxels(volume, (1.5,) * 3, VENTRICLE_CENTRE, VENTRICLE_SEMI, side, 1.8, dark=-1.0)
                      for side in (-1, 1)]
        hippocampi = [_dark_voxels(volume, (1.5,) * 3, HIPPOCAMPUS_CENTRE, HIPPOCAMPUS_SEMI, side, 1.0, dark=-1.0)
                      for side in (-1, 1)]
        assert ventricles[1] > 2 * ventricles[0] and hippocampi[0] > 2 * hippocampi[1] + 5, (case_id, ventricles,
                                                                                             hippocampi)
        orientations.add(entry["properties"]["raw_orientation"])
    assert orientations == {"LPS", "PIR"}


def test_prepare_selects_classes_and_refuses_a_missing_class(adni_root, tmp_path):
    index = prepare_classification_dataset(find_adni_cases(adni_root), tmp_path / "mci", ["sMCI", "pMCI"],
                                           (3.0, 3.0, 3.0), (16, 16, 16), progress=False)
    assert {e["class_name"] for e in index["cases"].values()} == {"sMCI", "pMCI"}
    assert index["labels"] == {"0": "sMCI", "1": "pMCI"}
    nc_only = [c for c in find_adni_cases(adni_root) if c.class_name == "NC"]
    with pytest.raises(DataError, match=r"no cases of class\(es\) \['AD'\]"):
        prepare_classification_dataset(nc_only, tmp_path / "x", ["NC", "AD"], (3.0,) * 3, (16,) * 3, progress=False)


def test_unreadable_volume_is_named_and_the_previous_output_kept(adni_root, tmp_path):
    out = tmp_path / "out"
    cases = find_adni_cases(adni_root)
    prepare_classification_dataset(cases, out, ["NC", "AD"], (3.0,) * 3, (16,) * 3, progress=False)
    before = {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(cases[1].images["t1"].read_bytes()[:300])  # a truncated gzip stream
    bad = [*cases[:1], type(cases[1])(cases[1].case_id, {"t1": broken}, None, cases[1].subject, cases[1].class_name)]
    with pytest.raises(DataError, match=rf"case {cases[1].case_id}: cannot read {broken}"):
        prepare_classification_dataset(bad + cases[2:], out, ["NC", "AD"], (3.0,) * 3, (16,) * 3, progress=False)
    assert {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()} == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging left behind
