"""Reader for the ADNI classification layout: a CSV manifest plus T1 volumes.

The manifest (``<root>/manifest.csv``, or ``root`` itself when it is a CSV file) has one row per
scan with columns ``subject``, ``image`` (a path relative to the manifest) and ``diagnosis``
(NC, AD, sMCI or pMCI), and optionally ``visit`` (e.g. bl, m12) when a subject has several
scans. A case is one row; its id is ``<subject>_<visit>`` (or the subject alone without a visit).
The dataset root is the manifest's folder: an image path that resolves outside it (``..``, an
absolute path, a symlink) is refused. Only the manifest and the existence of the files are
checked here; the volumes' contents are validated when preprocessing loads them. Every error
names the manifest line.
"""

from __future__ import annotations

import csv
from pathlib import Path

from nnmamba.data.cases import ClassifiedCase
from nnmamba.data.errors import DataError
from nnmamba.data.readers.paths import check_inside_root

ADNI_DIAGNOSES = ("NC", "AD", "sMCI", "pMCI")
ADNI_LABELS = dict(enumerate(ADNI_DIAGNOSES))
ADNI_CHANNELS = ("t1",)
MANIFEST_NAME = "manifest.csv"
REQUIRED_COLUMNS = ("subject", "image", "diagnosis")
VISIT_COLUMN = "visit"


def manifest_path(root: Path) -> Path:
    """``root`` when it is the manifest file itself, else ``root/manifest.csv``."""
    root = Path(root)
    return root if root.suffix.lower() == ".csv" else root / MANIFEST_NAME


def adni_case_id(subject: str, visit: str) -> str:
    return f"{subject}_{visit}" if visit else subject


def find_adni_cases(root: Path) -> list[ClassifiedCase]:
    """Every manifest row as a case, sorted by case id.

    Raises DataError for a missing or empty manifest, missing columns, an empty cell, an
    unknown diagnosis, an image file that does not exist or resolves outside the manifest's
    folder, or two rows with the same case id or the same image.
    """
    path = manifest_path(root)
    if not path.is_file():
        raise DataError(f"ADNI manifest {path} does not exist")
    with path.open(newline="", encoding="utf-8-sig") as handle:  # a BOM when saved from Excel
        reader = csv.DictReader(handle)
        missing = [c for c in REQUIRED_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise DataError(f"{path}: missing column(s) {missing}; found {reader.fieldnames}")
        # Line numbers as an editor shows them: the header is line 1.
        rows = [(line, row) for line, row in enumerate(reader, start=2)]
    if not rows:
        raise DataError(f"{path}: no rows")
    cases: dict[str, tuple[int, ClassifiedCase]] = {}
    images: dict[Path, int] = {}
    for line, row in rows:
        case = _read_row(path, line, row)
        image = case.images[ADNI_CHANNELS[0]].resolve()
        if case.case_id in cases:
            raise DataError(f"{path} lines {cases[case.case_id][0]} and {line}: case {case.case_id} appears twice "
                            f"(subject {case.subject!r}; give each scan of a subject its own visit)")
        if image in images:
            raise DataError(f"{path} lines {images[image]} and {line}: both rows point to image {image}")
        cases[case.case_id] = (line, case)
        images[image] = line
    return [cases[case_id][1] for case_id in sorted(cases)]


def _read_row(path: Path, line: int, row: dict[str, str | None]) -> ClassifiedCase:
    values = {key: (row.get(key) or "").strip() for key in (*REQUIRED_COLUMNS, VISIT_COLUMN)}
    empty = [key for key in REQUIRED_COLUMNS if not values[key]]
    if empty:
        raise DataError(f"{path} line {line}: empty {', '.join(empty)}")
    where = f"{path} line {line} (subject {values['subject']})"
    if values["diagnosis"] not in ADNI_DIAGNOSES:
        raise DataError(f"{where}: unknown diagnosis {values['diagnosis']!r}; expected one of {list(ADNI_DIAGNOSES)}")
    image = path.parent / values["image"]
    # Containment before existence: a path outside the root is refused without probing it.
    check_inside_root([image], path.parent, where)
    if not image.is_file():
        raise DataError(f"{where}: image {values['image']} not found (looked for {image})")
    return ClassifiedCase(
        case_id=adni_case_id(values["subject"], values[VISIT_COLUMN]),
        images={ADNI_CHANNELS[0]: image},
        label=None,
        subject=values["subject"],
        class_name=values["diagnosis"],
    )
