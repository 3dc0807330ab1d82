"""Reader for the AMOS 2022 raw layout (abdominal multi-organ CT and MRI, 15 organs).

``<root>/dataset.json``, ``imagesTr/ labelsTr/`` (200 CT + 40 MRI), ``imagesVa/ labelsVa/``
(100 CT + 20 MRI) and ``imagesTs/`` (unlabelled; scored on the challenge site), files
``amos_XXXX.nii.gz`` with one channel each. Case ids below 500 are CT, from 500 MRI, so one
study reads one modality: CT and MRI need different normalisation and are reported apart
(the paper's Table 2). Labels come from dataset.json (MSD dialect).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

from nnmamba.data.cases import CaseFiles, RawDataset
from nnmamba.data.readers.dataset_json import read_dataset_json
from nnmamba.data.errors import DataError
from nnmamba.data.readers.nnunet import SUBSET_OF_FOLDER, image_files, label_file
from nnmamba.data.readers.paths import check_inside_root

AMOS_MR_FIRST_ID = 500
AMOS_MODALITIES = ("CT", "MR")
AMOS_CASE = re.compile(r"^amos_(?P<number>\d+)$")
AMOS_FILE_ENDING = ".nii.gz"


def amos_modality(case_id: str) -> str:
    """``"CT"`` for ids below 500, ``"MR"`` from 500 (the AMOS convention)."""
    match = AMOS_CASE.match(case_id)
    if match is None:
        raise DataError(f"{case_id!r} is not an AMOS case id (amos_XXXX)")
    return "CT" if int(match["number"]) < AMOS_MR_FIRST_ID else "MR"


def read_amos_dataset(
    root: Path, modality: str | None = None, subsets: Sequence[str] = ("imagesTr", "imagesVa")
) -> RawDataset:
    """The cases of one modality (``"CT"`` or ``"MR"``) in the given image folders.

    The channel is named after the modality, which selects the normalisation (CT:
    clip + dataset z-score; MR: per-image z-score). Raises DataError for a missing
    modality choice, folder or label, a file not named ``amos_XXXX.nii.gz``, a file resolving
    outside ``root``, or no case.
    """
    root = Path(root)
    if modality is None or modality.upper() not in AMOS_MODALITIES:
        raise DataError(f"AMOS dataset {root}: choose a modality, one of {list(AMOS_MODALITIES)} "
                        f"(dataset.reader.modality in params.yaml), got {modality!r}")
    modality = modality.upper()
    description = read_dataset_json(root)
    cases = []
    for folder in subsets:
        for path in image_files(root, folder, AMOS_FILE_ENDING):
            case_id = path.name[: -len(AMOS_FILE_ENDING)]
            if AMOS_CASE.match(case_id) is None:
                raise DataError(f"{path}: AMOS image files are named amos_XXXX{AMOS_FILE_ENDING}")
            if amos_modality(case_id) == modality:
                label = label_file(root, folder, case_id, AMOS_FILE_ENDING)
                case = CaseFiles(case_id, {modality: path}, label, subset=SUBSET_OF_FOLDER[folder])
                check_inside_root(case.files(), root, f"case {case_id}")
                cases.append(case)
    if not cases:
        raise DataError(f"AMOS dataset {root}: no {modality} cases in {list(subsets)}")
    return RawDataset(cases, description.labels, (modality,))
