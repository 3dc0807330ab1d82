"""Whole-volume preprocessing for image-level labels (classification), torchio throughout.

A classifier sees the whole scan, so every case becomes a volume of ONE fixed shape at ONE fixed
spacing: canonical (RAS) orientation, resampling to ``spacing``, z-score inside the head mask
(nonzero voxels: skull-stripped or zero-background scans; a scan with a noisy background makes
it the whole volume), then crop or pad to ``shape`` centred on the head. The output folder has
the layout of the segmentation one (images/, dataset.json), with each case's class in
dataset.json instead of a label map, so the same loaders and split code read both.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
import torchio as tio
from tqdm import tqdm

from nnmamba.atomic import staged_directory
from nnmamba.data.cases import ClassifiedCase
from nnmamba.data.errors import DataError
from nnmamba.data.intensity_ranges import dataset_ranges, image_ranges
from nnmamba.data.preprocessing.preprocess import DATASET_JSON, IMAGE_SUFFIX, load_case

MASK_KEY = "head"


def preprocess_volume(subject: tio.Subject, spacing: Sequence[float], shape: Sequence[int]) -> tio.Subject:
    """Canonical, resampled to ``spacing`` (mm), z-scored in the head mask, cropped/padded to ``shape``.

    ``subject`` holds a one-channel ``image`` (as ``load_case`` returns it); the result holds
    ``image`` and the resampled head ``mask`` (``MASK_KEY``). Voxels outside the head are 0.
    """
    case_id = subject.get("case_id", "<unnamed>")
    canonical = tio.ToCanonical()(subject)
    head = canonical["image"].data != 0
    if not head.any():
        raise DataError(f"case {case_id}: every voxel is 0, no head to normalise")
    if canonical["image"].data[head].std() == 0:
        raise DataError(f"case {case_id}: the image is constant inside the head")
    volume = tio.Subject(
        image=tio.ScalarImage(tensor=canonical["image"].data.to(torch.float32), affine=canonical["image"].affine),
        **{MASK_KEY: tio.LabelMap(tensor=head.to(torch.uint8), affine=canonical["image"].affine)},
        case_id=case_id,
    )
    transform = tio.Compose([
        # Antialiasing: downsampling a 1 mm scan without it aliases thin structures (cortex, vessels).
        tio.Resample(tuple(float(s) for s in spacing), antialias=True),
        tio.ZNormalization(masking_method=MASK_KEY),
        tio.Mask(masking_method=MASK_KEY),
        tio.CropOrPad(tuple(int(s) for s in shape), mask_name=MASK_KEY),
    ])
    return transform(volume)


def prepare_classification_dataset(
    cases: Sequence[ClassifiedCase],
    out_dir: Path,
    classes: Sequence[str],
    spacing: Sequence[float],
    shape: Sequence[int],
    progress: bool = True,
) -> dict:
    """Preprocess the cases of ``classes`` into ``out_dir`` (images/, dataset.json), atomically.

    Cases of other classes are left out (one raw ADNI manifest serves both NC-vs-AD and
    sMCI-vs-pMCI). Class ``classes[i]`` has index i; the last one is the positive class of
    binary metrics. As for segmentation, everything is written to a temporary sibling that
    replaces ``out_dir`` only when every case succeeded. Returns the dataset.json content.
    """
    selected = _select_cases(cases, classes)
    channels = list(selected[0].images)
    with staged_directory(Path(out_dir)) as staging:
        (staging / "images").mkdir()
        entries = {}
        for case in tqdm(selected, desc="prepare", unit="case", disable=not progress):
            entries[case.case_id] = _prepare_case(case, staging, classes, spacing, shape)
        dataset = {
            "channels": channels,
            "labels": {str(i): name for i, name in enumerate(classes)},
            "cases": entries,
            "intensity_ranges": dataset_ranges([e["intensity_range"] for e in entries.values()], channels),
        }
        (staging / DATASET_JSON).write_text(json.dumps(dataset, indent=2))
    return dataset


def _select_cases(cases: Sequence[ClassifiedCase], classes: Sequence[str]) -> list[ClassifiedCase]:
    if len(set(classes)) != len(classes) or len(classes) < 2:
        raise DataError(f"classes must be at least two distinct names, got {list(classes)}")
    selected = [case for case in cases if case.class_name in classes]
    counts = {name: sum(case.class_name == name for case in selected) for name in classes}
    empty = [name for name, count in counts.items() if count == 0]
    if empty:
        raise DataError(f"no cases of class(es) {empty} among the {len(cases)} cases (classes found: "
                        f"{sorted({case.class_name for case in cases})})")
    return selected


def _prepare_case(case: ClassifiedCase, staging: Path, classes: Sequence[str], spacing: Sequence[float],
                  shape: Sequence[int]) -> dict:
    raw = load_case(case, label_values=None)
    volume = preprocess_volume(raw, spacing, shape)
    image_rel = f"images/{case.case_id}{IMAGE_SUFFIX}"
    volume["image"].save(staging / image_rel)
    return {
        "image": image_rel,
        "label": None,
        "subject": case.subject,
        "class_name": case.class_name,
        "class_index": list(classes).index(case.class_name),
        "raw_images": {name: str(Path(path).resolve()) for name, path in case.images.items()},
        "intensity_range": image_ranges(raw["image"].data),
        "properties": {
            "raw_shape": list(raw["image"].spatial_shape),
            "raw_spacing": [float(s) for s in raw["image"].spacing],
            "raw_orientation": "".join(raw["image"].orientation),
            "preprocessed_shape": list(volume["image"].spatial_shape),
            "preprocessed_affine": volume["image"].affine.tolist(),
        },
    }
