"""Synthetic nnU-Net v2 / MSD raw dataset: multi-channel abdominal phantoms in any ITK format.

``imagesTr/<case>_0000<ending>`` (+ ``_0001``...), ``labelsTr/<case><ending>``, ``imagesTs/``
(unlabelled) and ``dataset.json`` in either dialect (nnU-Net v2 ``channel_names`` +
``file_ending``, or MSD ``modality``). What a generic reader must survive is varied on purpose:
the file format (.nrrd, .mha, .nii.gz), the label dtype (int32, uint16, ...), strongly
anisotropic spacing, orientations with permuted axes, and channels needing different
normalisation (a "CT" channel next to an MR one).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from nnmamba.data.synthetic.abdomen_phantom import ct_intensities, mr_intensities, paint_abdomen, save_oriented
from nnmamba.data.readers.dataset_json import DATASET_JSON

# The dataset's classes and the phantom organs (AMOS labels) each is made of.
NNUNET_CLASSES: dict[str, tuple[int, ...]] = {"liver": (6,), "spleen": (1,), "kidney": (2, 3)}
ORIENTATIONS = (("L", "P", "S"), ("R", "A", "S"), ("P", "I", "R"))
CASE_ID = "case_{index:03d}"


def write_synthetic_nnunet(
    root: Path,
    n_train: int,
    n_test: int = 0,
    channels: Sequence[str] = ("CT", "MR"),
    field_of_view_mm: Sequence[float] = (160.0, 128.0, 120.0),
    spacing: Sequence[float] = (2.0, 2.0, 6.5),
    file_ending: str = ".nrrd",
    label_dtype: str = "int32",
    dialect: str = "v2",
    seed: int = 0,
) -> list[str]:
    """Write ``n_train`` labelled and ``n_test`` unlabelled cases under ``root``; return the case ids.

    A channel named "CT" (any case) is imaged in Hounsfield units, any other as MR.
    ``dialect`` is ``"v2"`` (nnU-Net v2 dataset.json) or ``"msd"`` (Decathlon; .nii.gz only).
    """
    if dialect not in ("v2", "msd"):
        raise ValueError(f"dialect must be 'v2' or 'msd', got {dialect!r}")
    if dialect == "msd" and file_ending != ".nii.gz":
        raise ValueError(f"the MSD dialect has no file_ending: files must be .nii.gz, got {file_ending!r}")
    root = Path(root)
    case_ids = []
    for index in range(n_train + n_test):
        case_id = CASE_ID.format(index=index)
        folder = "imagesTr" if index < n_train else "imagesTs"
        _write_case(root, folder, case_id, index, channels, field_of_view_mm, spacing, file_ending,
                    np.dtype(label_dtype), np.random.default_rng([seed, index]))
        case_ids.append(case_id)
    _write_dataset_json(root, channels, file_ending, dialect, n_train)
    return case_ids


def _write_case(root: Path, folder: str, case_id: str, index: int, channels: Sequence[str],
                fov: Sequence[float], spacing: Sequence[float], file_ending: str, label_dtype: np.dtype,
                rng: np.random.Generator) -> None:
    shape = tuple(max(int(round(f / s)), 4) for f, s in zip(fov, spacing))
    tissue = paint_abdomen(shape, tuple(spacing), rng)
    codes = ORIENTATIONS[index % len(ORIENTATIONS)]
    for channel, name in enumerate(channels):
        image = (ct_intensities if name.upper() == "CT" else mr_intensities)(tissue, rng)
        save_oriented(root / folder / f"{case_id}_{channel:04d}{file_ending}", image, spacing, codes, label=False)
    if folder == "imagesTr":
        labels = np.zeros(shape, dtype=label_dtype)
        for value, organs in enumerate(NNUNET_CLASSES.values(), start=1):
            labels[np.isin(tissue, organs)] = value
        save_oriented(root / "labelsTr" / f"{case_id}{file_ending}", labels, spacing, codes, label=True)


def _write_dataset_json(root: Path, channels: Sequence[str], file_ending: str, dialect: str, n_train: int) -> None:
    names = ["background", *NNUNET_CLASSES]
    if dialect == "v2":
        content = {
            "channel_names": {str(i): name for i, name in enumerate(channels)},
            "labels": {name: value for value, name in enumerate(names)},
            "numTraining": n_train,
            "file_ending": file_ending,
        }
    else:
        content = {
            "modality": {str(i): name for i, name in enumerate(channels)},
            "labels": {str(value): name for value, name in enumerate(names)},
            "numTraining": n_train,
        }
    root.mkdir(parents=True, exist_ok=True)
    (root / DATASET_JSON).write_text(json.dumps({"name": "synthetic abdomen (nnmamba)", **content}, indent=2))
