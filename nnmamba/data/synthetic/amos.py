"""Synthetic AMOS 2022: abdominal CT and MR phantoms written as real files in the AMOS layout.

``imagesTr/ labelsTr/ imagesVa/ labelsVa/ imagesTs/`` (unlabelled, as AMOS ships it) and an
MSD-dialect ``dataset.json``; CT cases are numbered from 1, MR cases from 500 (the AMOS id rule).
Each case has its own spacing (in-plane and slice thickness jittered around the modality's) over
one field of view, so shapes differ per case and the plan has a target spacing to choose; odd
cases are stored LPS instead of RAS, as DICOM-converted scans often are.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from nnmamba.data.synthetic.abdomen_phantom import (
    AMOS_LABELS,
    ct_intensities,
    mr_intensities,
    organ_labels,
    paint_abdomen,
    save_oriented,
)
from nnmamba.data.readers.amos import AMOS_FILE_ENDING, AMOS_MR_FIRST_ID
from nnmamba.data.readers.dataset_json import DATASET_JSON
from nnmamba.data.readers.nnunet import SUBSET_OF_FOLDER

ORIENTATIONS = (("R", "A", "S"), ("L", "P", "S"))
FIRST_ID = {"CT": 1, "MR": AMOS_MR_FIRST_ID}
IMAGE_OF = {"CT": ct_intensities, "MR": mr_intensities}
# Per-case spacing jitter: in-plane factor range, slice thickness factors.
IN_PLANE_JITTER = (0.9, 1.1)
SLICE_FACTORS = (0.8, 1.0, 1.25)
DATASET_KEYS = {"imagesTr": "training", "imagesVa": "validation", "imagesTs": "test"}


def write_synthetic_amos(
    root: Path,
    cases: Mapping[str, Mapping[str, int]],
    field_of_view_mm: Sequence[float] = (160.0, 128.0, 120.0),
    modality_spacing: Mapping[str, Sequence[float]] | None = None,
    seed: int = 0,
) -> list[str]:
    """Write ``cases[modality][folder]`` cases per modality ("CT"/"MR") and image folder; return the ids.

    ``modality_spacing`` is each modality's typical voxel size in mm (RAS order), e.g.
    ``{"CT": [2.5, 2.5, 6.0], "MR": [3.0, 3.0, 8.0]}``.
    """
    root = Path(root)
    modality_spacing = modality_spacing or {"CT": (2.5, 2.5, 6.0), "MR": (3.0, 3.0, 8.0)}
    listing: dict[str, list[dict]] = {key: [] for key in DATASET_KEYS.values()}
    written = []
    for modality, per_folder in cases.items():
        number = FIRST_ID[modality]
        for folder, count in per_folder.items():
            for _ in range(count):
                case_id = f"amos_{number:04d}"
                rng = np.random.default_rng([seed, number])
                spacing = modality_spacing[modality]
                entry = _write_case(root, folder, case_id, modality, field_of_view_mm, spacing, rng, number)
                listing[DATASET_KEYS[folder]].append(entry)
                written.append(case_id)
                number += 1
    _write_dataset_json(root, listing)
    return written


def _write_case(root: Path, folder: str, case_id: str, modality: str, fov: Sequence[float],
                spacing: Sequence[float], rng: np.random.Generator, number: int) -> dict:
    in_plane = rng.uniform(*IN_PLANE_JITTER)
    case_spacing = (spacing[0] * in_plane, spacing[1] * in_plane, spacing[2] * rng.choice(SLICE_FACTORS))
    shape = tuple(max(int(round(f / s)), 4) for f, s in zip(fov, case_spacing))
    tissue = paint_abdomen(shape, case_spacing, rng)
    codes = ORIENTATIONS[number % len(ORIENTATIONS)]
    image_path = root / folder / f"{case_id}{AMOS_FILE_ENDING}"
    save_oriented(image_path, IMAGE_OF[modality](tissue, rng), case_spacing, codes, label=False)
    entry = {"image": f"./{folder}/{image_path.name}"}
    if SUBSET_OF_FOLDER[folder] != "test":
        label_path = root / folder.replace("images", "labels", 1) / image_path.name
        save_oriented(label_path, organ_labels(tissue), case_spacing, codes, label=True)
        entry["label"] = f"./{label_path.parent.name}/{label_path.name}"
    return entry


def _write_dataset_json(root: Path, listing: dict[str, list[dict]]) -> None:
    content = {
        "name": "AMOS (synthetic)",
        "description": "Synthetic abdominal phantoms in the AMOS 2022 layout (nnmamba)",
        "modality": {"0": "CT"},
        "labels": {str(k): v for k, v in AMOS_LABELS.items()},
        "numTraining": len(listing["training"]),
        "numValidation": len(listing["validation"]),
        "numTest": len(listing["test"]),
        **listing,
    }
    root.mkdir(parents=True, exist_ok=True)
    (root / DATASET_JSON).write_text(json.dumps(content, indent=2))
