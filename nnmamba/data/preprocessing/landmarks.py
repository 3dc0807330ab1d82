"""Preprocessing of a landmark dataset: the segmentation steps plus resampling, with the points carried along.

Each image goes through ``preprocess_subject`` (canonical orientation, z-score inside the head mask,
crop to the mask) and is then resampled to the study's spacing (nnU-Net's order: crop, normalise,
resample). None of these steps moves anatomy in world space, and the written NIfTI keeps the
voxel -> world affine, so the landmarks stay what they were: world coordinates in mm. They are
checked against the raw volume (an annotation error) and against the preprocessed one (a point
cropped away with the background), and written into dataset.json.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torchio as tio
from tqdm import tqdm

from nnmamba.atomic import staged_directory
from nnmamba.data.errors import DataError
from nnmamba.data.intensity_ranges import dataset_ranges, image_ranges
from nnmamba.data.readers.landmarks import LandmarkCaseFiles, check_inside, read_landmarks
from nnmamba.data.preprocessing.plan import Preprocessing
from nnmamba.data.preprocessing.preprocess import DATASET_JSON, IMAGE_SUFFIX, load_case, preprocess_subject


def prepare_landmark_dataset(
    cases: list[LandmarkCaseFiles],
    out_dir: Path,
    names: Sequence[str],
    spacing: Sequence[float],
    crop_margin: int,
    progress: bool = True,
) -> dict:
    """Preprocess every case into ``out_dir`` (images/, dataset.json) atomically; returns dataset.json's content.

    dataset.json holds, per case, the preprocessed image, the raw files and ``landmarks_mm``: name ->
    [x, y, z] RAS world mm, in the order of ``names`` (the network's output channels).
    """
    if not cases:
        raise DataError("no cases to prepare")
    channels = list(cases[0].images)
    with staged_directory(out_dir) as staging:
        (staging / "images").mkdir()
        entries = {}
        for case in tqdm(cases, desc="prepare", unit="case", disable=not progress):
            if list(case.images) != channels:
                raise DataError(f"case {case.case_id}: channels {list(case.images)} differ from {channels}")
            if case.case_id in entries:
                raise DataError(f"case {case.case_id}: case id appears twice")
            entries[case.case_id] = _prepare_case(case, staging, names, spacing, crop_margin)
        dataset = {"channels": channels, "landmarks": list(names), "spacing": [float(s) for s in spacing],
                   "cases": entries,
                   "intensity_ranges": dataset_ranges([e["intensity_range"] for e in entries.values()], channels)}
        (staging / DATASET_JSON).write_text(json.dumps(dataset, indent=2))
    return dataset


def preprocess_landmark_case(raw: tio.Subject, spacing: Sequence[float], crop_margin: int
                             ) -> tuple[tio.ScalarImage, dict]:
    """The network input of one loaded case (``load_case``) and its properties: canonical, z-scored
    inside the head mask, cropped to it, resampled to ``spacing``; its affine maps voxels to world mm."""
    head_mask = Preprocessing.head_mask(raw["image"].num_channels)
    preprocessing = Preprocessing(head_mask.normalization, target_spacing=tuple(float(s) for s in spacing))
    subject, properties = preprocess_subject(raw, crop_margin, preprocessing)
    return subject["image"], properties


def _prepare_case(case: LandmarkCaseFiles, staging: Path, names: Sequence[str], spacing: Sequence[float],
                  crop_margin: int) -> dict:
    points = read_landmarks(case.points, names, case.case_id)
    raw = load_case(case, label_values=None)
    image_path = next(iter(case.images.values()))
    check_inside(case.case_id, points, raw["image"].affine, raw["image"].spatial_shape, f"the image {image_path}")
    image, properties = preprocess_landmark_case(raw, spacing, crop_margin)
    check_inside(case.case_id, points, image.affine, image.spatial_shape,
                 f"the head-mask crop of {image_path} (fix the point, or raise prepare.crop_margin)")
    image_rel = f"images/{case.case_id}{IMAGE_SUFFIX}"
    image.save(staging / image_rel)
    return {
        "image": image_rel,
        "label": None,
        "raw_images": {name: str(Path(path).resolve()) for name, path in case.images.items()},
        "raw_points": str(Path(case.points).resolve()),
        "landmarks_mm": points,
        "properties": properties,
        "intensity_range": image_ranges(raw["image"].data),
    }
