"""The ``dataset.json`` of a raw nnU-Net v2, Medical Segmentation Decathlon or AMOS dataset.

Two dialects exist and both are read into one :class:`DatasetDescription`:

- nnU-Net v2: ``channel_names`` ({"0": "CT"}), ``labels`` as name -> value
  ({"background": 0, "liver": 1}) and ``file_ending`` (".nii.gz", ".nrrd", ".mha", ...);
- MSD / nnU-Net v1 / AMOS: ``modality`` ({"0": "MRI"}) and ``labels`` as value -> name
  ({"0": "background", "1": "liver"}); files are always ``.nii.gz``.

Labels must be the consecutive integers 0..K-1 (what nnU-Net requires too): the network's
output channel k is label value k, so a gap would silently shift every class after it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from nnmamba.data.errors import DataError

DATASET_JSON = "dataset.json"
MSD_FILE_ENDING = ".nii.gz"


@dataclass(frozen=True)
class DatasetDescription:
    """Channel names in input order, label value -> name, and the image file ending."""

    channels: tuple[str, ...]
    labels: dict[int, str]
    file_ending: str


def read_dataset_json(root: Path) -> DatasetDescription:
    """Parse ``<root>/dataset.json``; a DataError names the file and the problem."""
    path = Path(root) / DATASET_JSON
    if not path.is_file():
        raise DataError(f"{path} is missing: an nnU-Net/MSD/AMOS dataset describes itself in dataset.json")
    try:
        content = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise DataError(f"cannot read {path}: {error}") from error
    if not isinstance(content, dict):
        raise DataError(f"{path}: expected a JSON object, got {type(content).__name__}")
    channels = _channels(path, content)
    labels = _labels(path, content)
    file_ending = content.get("file_ending", MSD_FILE_ENDING)
    if not isinstance(file_ending, str) or not file_ending.startswith("."):
        raise DataError(f"{path}: file_ending must look like '.nii.gz', got {file_ending!r}")
    return DatasetDescription(channels, labels, file_ending)


def _channels(path: Path, content: dict) -> tuple[str, ...]:
    key = "channel_names" if "channel_names" in content else "modality"
    mapping = content.get(key)
    if not isinstance(mapping, dict) or not mapping:
        raise DataError(f"{path}: needs 'channel_names' (nnU-Net v2) or 'modality' (MSD), e.g. {{\"0\": \"CT\"}}")
    by_index = _integer_keys(path, key, mapping)
    if sorted(by_index) != list(range(len(mapping))):
        raise DataError(f"{path}: {key} keys must be 0..{len(mapping) - 1}, each once, got {sorted(mapping)}")
    names = tuple(str(by_index[i]) for i in range(len(by_index)))
    if len(set(names)) != len(names):
        raise DataError(f"{path}: {key} repeats a channel name: {list(names)}")
    return names


def _labels(path: Path, content: dict) -> dict[int, str]:
    mapping = content.get("labels")
    if not isinstance(mapping, dict) or not mapping:
        raise DataError(f"{path}: needs 'labels', e.g. {{\"background\": 0, \"liver\": 1}}")
    if all(str(key).lstrip("-").isdigit() for key in mapping):  # MSD: value -> name
        labels = {int(key): str(name) for key, name in mapping.items()}
    else:  # nnU-Net v2: name -> value
        labels = {}
        for name, value in mapping.items():
            if name == "ignore":
                raise DataError(f"{path}: the nnU-Net 'ignore' label is not supported")
            if isinstance(value, bool) or not isinstance(value, int):
                raise DataError(
                    f"{path}: label {name!r} has value {value!r}; only integer labels are supported "
                    "(not nnU-Net's region-based training)"
                )
            if value in labels:
                raise DataError(f"{path}: labels {labels[value]!r} and {name!r} share the value {value}")
            labels[value] = str(name)
    values = sorted(labels)
    if values != list(range(len(values))):
        raise DataError(f"{path}: label values must be the consecutive integers 0..K-1 (0 = background), got {values}")
    return dict(sorted(labels.items()))


def _integer_keys(path: Path, key: str, mapping: dict) -> dict[int, object]:
    """``mapping`` keyed by channel index; "0" and "00" both mean 0, so they must not both appear."""
    try:
        return {int(k): v for k, v in mapping.items()}
    except ValueError as error:
        raise DataError(f"{path}: {key} keys must be channel indices, got {sorted(mapping)}") from error
