"""Reader for the generic nnU-Net v2 / Medical Segmentation Decathlon raw layout.

``<root>/dataset.json``, ``imagesTr/<case>_0000<ending>``, ``_0001``... (one file per
channel, in ``channel_names`` order), ``labelsTr/<case><ending>``, and optionally
``imagesTs/`` (+ ``labelsTs/``). ``<ending>`` is the dataset's ``file_ending``: any
format ITK reads (.nii.gz, .nii, .nrrd, .mha, ...). Like the BraTS reader, only the
layout is checked here (which files exist, all inside the root even through symlinks);
contents are validated on loading.
`nnmamba.predict` reads its inputs' channel files with the same parser and grouping.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from functools import partial
from pathlib import Path

from nnmamba.data.cases import CaseFiles, RawDataset
from nnmamba.data.readers.dataset_json import DATASET_JSON, DatasetDescription, read_dataset_json
from nnmamba.data.errors import DataError
from nnmamba.data.readers.paths import check_inside_root

# Image folder -> the split the dataset assigns its cases to. Cases of training and
# validation folders must be labelled; test cases are labelled only where a labels
# folder exists (e.g. a challenge's released test labels).
SUBSET_OF_FOLDER = {"imagesTr": "train", "imagesVa": "val", "imagesTs": "test"}
CHANNEL_FILE = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")
# The ending of a file named like a channel file, whatever its format: "case_000_0000.nii.gz" -> ".nii.gz".
CHANNEL_FILE_ENDING = re.compile(r"_\d{4}(?P<ending>\.[^_]+)$")


def read_nnunet_dataset(root: Path, subsets: Sequence[str] = ("imagesTr",)) -> RawDataset:
    """Every case of the given image folders, with dataset.json's channel and label names.

    Raises DataError for a missing dataset.json or folder, a file not named
    ``<case>_XXXX<ending>``, a case missing a channel file, a training case
    missing its label, a file resolving outside ``root``, a folder whose files all
    have another ending than dataset.json's ``file_ending``, or no case at all.
    """
    root = Path(root)
    description = read_dataset_json(root)
    cases = []
    for folder in subsets:
        files = image_files(root, folder, description.file_ending)
        if not files:
            _check_file_ending(root, folder, description.file_ending)
        grouped = group_by_case(files, partial(_channel_of, description=description))
        cases += [_case(root, folder, case_id, channel_files, description)
                  for case_id, channel_files in grouped.items()]
    if not cases:
        raise DataError(f"nnU-Net dataset {root}: no cases in {list(subsets)}")
    return RawDataset(cases, description.labels, description.channels)


def image_files(root: Path, folder: str, file_ending: str) -> list[Path]:
    """The image files of one folder, sorted; DataError for an unknown or missing folder."""
    if folder not in SUBSET_OF_FOLDER:
        raise DataError(f"unknown image folder {folder!r}; known: {sorted(SUBSET_OF_FOLDER)}")
    directory = Path(root) / folder
    if not directory.is_dir():
        raise DataError(f"{directory} does not exist or is not a directory")
    return sorted(p for p in directory.iterdir() if p.name.endswith(file_ending) and not p.name.startswith("."))


def _check_file_ending(root: Path, folder: str, file_ending: str) -> None:
    """DataError if ``folder`` holds channel files of other endings only: dataset.json's file_ending is wrong.

    Without this, a .nrrd dataset declared as .nii.gz surfaces only as "no cases", which
    does not say that one key of dataset.json is the fault.
    """
    endings = Counter(match["ending"] for path in (Path(root) / folder).iterdir()
                      if not path.name.startswith(".") and (match := CHANNEL_FILE_ENDING.search(path.name)))
    if endings:
        held = ", ".join(f"{count} {ending!r}" for ending, count in endings.most_common())
        raise DataError(f"{Path(root) / DATASET_JSON}: file_ending {file_ending!r} matches no file in {folder}, "
                        f"which holds {held} files: set file_ending to {endings.most_common(1)[0][0]!r}")


def label_file(root: Path, folder: str, case_id: str, file_ending: str) -> Path | None:
    """The case's label file in the folder's labels twin (imagesTr -> labelsTr).

    Missing labels are an error for training and validation folders and mean
    "unlabelled" for test folders (None).
    """
    path = Path(root) / folder.replace("images", "labels", 1) / f"{case_id}{file_ending}"
    if path.is_file():
        return path
    if SUBSET_OF_FOLDER[folder] == "test":
        return None
    raise DataError(f"case {case_id}: label missing, expected file {path}")


def channel_file(path: Path, file_ending: str, n_channels: int, naming_rule: str, declared: str) -> tuple[str, int]:
    """(case id, channel index) of an image file named ``<case>_XXXX<file_ending>``.

    The one parser of nnU-Net channel names, for datasets and for inputs to predict on alike.
    ``naming_rule`` and ``declared`` (who declares the channels, and how many) word the
    DataErrors for a file of another name and for a channel index beyond ``n_channels``.
    """
    match = CHANNEL_FILE.match(path.name[: -len(file_ending)])
    if match is None:
        raise DataError(f"{path}: {naming_rule}")
    channel = int(match["channel"])
    if channel >= n_channels:
        raise DataError(f"case {match['case']}: {path} is channel {channel:04d} but {declared}")
    return match["case"], channel


def group_by_case(files: Iterable[Path], channel_of: Callable[[Path], tuple[str, int]]) -> dict[str, dict[int, Path]]:
    """case id -> {channel index: file}; ``channel_of`` names each file's case and channel."""
    cases: dict[str, dict[int, Path]] = {}
    for path in files:
        case_id, channel = channel_of(path)
        cases.setdefault(case_id, {})[channel] = path
    return cases


def channel_images(case_id: str, channel_files: dict[int, Path], channels: Sequence[str], folder: Path,
                   file_ending: str, by_name: bool = False) -> dict[str, Path]:
    """channel name -> file, in ``channels`` order; a missing channel is a DataError naming the file
    expected (``<case>_XXXX``, or ``<case>-<channel name>`` for files named by channel, as BraTS's)."""
    images = {}
    for index, name in enumerate(channels):
        if index not in channel_files:
            expected = Path(folder) / (f"{case_id}-{name}{file_ending}" if by_name
                                       else f"{case_id}_{index:04d}{file_ending}")
            raise DataError(f"case {case_id}: channel {index:04d} ({name}) missing, expected file {expected}")
        images[name] = channel_files[index]
    return images


def _channel_of(path: Path, description: DatasetDescription) -> tuple[str, int]:
    n_channels = len(description.channels)
    return channel_file(path, description.file_ending, n_channels,
                        f"image files must be named <case>_XXXX{description.file_ending} "
                        "(XXXX = 4-digit channel index)",
                        f"dataset.json declares {n_channels} channel(s) {list(description.channels)}")


def _case(root: Path, folder: str, case_id: str, channel_files: dict[int, Path],
          description: DatasetDescription) -> CaseFiles:
    images = channel_images(case_id, channel_files, description.channels, Path(root) / folder,
                            description.file_ending)
    label = label_file(root, folder, case_id, description.file_ending)
    case = CaseFiles(case_id=case_id, images=images, label=label, subset=SUBSET_OF_FOLDER[folder])
    check_inside_root(case.files(), root, f"case {case_id}")
    return case
