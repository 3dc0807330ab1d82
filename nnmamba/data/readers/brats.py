"""Reader for the BraTS 2023 (GLI) raw layout.

``<root>/BraTS-GLI-xxxxx-xxx/BraTS-GLI-xxxxx-xxx-{t1c,t1n,t2f,t2w,seg}.nii.gz``,
one folder per case. Only the layout is checked here (which files exist, all inside
the root even through symlinks); the files' contents are validated when preprocessing loads them.
"""

from __future__ import annotations

from pathlib import Path

from nnmamba.data.cases import CaseFiles
from nnmamba.data.errors import DataError
from nnmamba.data.readers.paths import check_inside_root

BRATS_MODALITIES = ("t1c", "t1n", "t2f", "t2w")
BRATS_LABELS = {0: "background", 1: "NCR", 2: "ED", 3: "ET"}
BRATS_SUFFIX = ".nii.gz"
BRATS_SEG = "seg"


def brats_file(case_dir: Path, suffix: str) -> Path:
    """Path of one file of a case, e.g. ``brats_file(dir, "t1c")``."""
    return case_dir / f"{case_dir.name}-{suffix}{BRATS_SUFFIX}"


def find_brats_cases(root: Path, require_labels: bool = True) -> list[CaseFiles]:
    """List every case folder under ``root``, sorted by case id.

    Raises DataError for a missing root, a root without case folders, a case
    missing a modality, (when ``require_labels``) a case missing its seg file, or a
    file resolving outside ``root`` (a symlinked case folder or file).
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"BraTS root {root} does not exist or is not a directory")
    case_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not case_dirs:
        raise DataError(f"BraTS root {root} contains no case folders")
    return [_read_case_dir(root, case_dir, require_labels) for case_dir in case_dirs]


def _read_case_dir(root: Path, case_dir: Path, require_labels: bool) -> CaseFiles:
    images = {modality: brats_file(case_dir, modality) for modality in BRATS_MODALITIES}
    for modality, path in images.items():
        if not path.is_file():
            raise DataError(f"case {case_dir.name}: modality {modality} missing, expected file {path}")
    label: Path | None = brats_file(case_dir, BRATS_SEG)
    if not label.is_file():
        if require_labels:
            raise DataError(f"case {case_dir.name}: segmentation missing, expected file {label}")
        label = None
    case = CaseFiles(case_id=case_dir.name, images=images, label=label)
    check_inside_root(case.files(), root, f"case {case.case_id}")
    return case
