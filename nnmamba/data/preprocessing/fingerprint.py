"""Dataset fingerprint: what planning needs to know about a raw dataset, nnU-Net style.

Per labelled case: voxel spacing (canonical RAS axis order, so axes mean the same in every
case), shape before and after cropping to the nonzero region, a seeded random sample of
intensities inside the labelled foreground per channel, and voxel counts per label. Over the
dataset: median spacing and cropped shape, the median fraction of the image the crop keeps,
foreground intensity statistics per channel (mean, std, median, 0.5/99.5 percentiles, min,
max) and class frequencies. The plan (``nnmamba.data.preprocessing.plan``) derives target spacing,
normalisation, patch and batch size from it.

Only labelled cases count (the foreground is defined by the labels); the fingerprint is taken
before the train/val/test split exists, so with a random split the test cases' intensities
enter the CT clipping range, as nnU-Net's validation folds enter its fingerprint.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import partial

import numpy as np
import torch
import torchio as tio

from nnmamba.data.cases import CaseFiles
from nnmamba.data.errors import DataError
from nnmamba.data.parallel import map_cases
from nnmamba.data.preprocessing.preprocess import bounding_box, load_case, nonzero_mask

PERCENTILES = {"percentile_00_5": 0.5, "percentile_99_5": 99.5}


def case_fingerprint(subject: tio.Subject, samples: int, rng: np.random.Generator) -> dict:
    """Spacing, shapes, foreground intensity samples and label counts of one loaded, labelled case."""
    canonical = tio.ToCanonical()(subject)
    image, label = canonical["image"], canonical["label"].data[0]
    mask = nonzero_mask(image.data)
    start, stop = bounding_box(mask, margin=0)
    foreground = label > 0
    n_foreground = int(foreground.sum())
    picks = rng.integers(0, n_foreground, size=samples) if n_foreground else np.zeros(0, dtype=np.int64)
    intensities = [channel[foreground].numpy()[picks].astype(np.float64) for channel in image.data]
    values, counts = torch.unique(label, return_counts=True)
    shape = np.asarray(image.spatial_shape)
    return {
        "spacing": [float(s) for s in image.spacing],
        "shape": [int(s) for s in shape],
        "shape_after_crop": [int(s) for s in stop - start],
        "relative_size_after_crop": float(np.prod(stop - start) / np.prod(shape)),
        "intensities": intensities,
        "label_voxels": {int(v): int(c) for v, c in zip(values, counts)},
    }


def dataset_fingerprint(
    cases: Sequence[CaseFiles],
    labels: Mapping[int, str],
    channels: Sequence[str],
    samples_per_case: int = 10_000,
    seed: int = 0,
    progress: bool = True,
    workers: int = 1,
) -> dict:
    """The JSON-serialisable fingerprint of the labelled cases (unlabelled ones are skipped).

    Every labelled case is loaded and validated (``load_case``), so bad input stops here with
    a DataError naming the case, before anything is written. Each case draws its intensity
    samples from its own index's generator, so ``workers`` processes give the same fingerprint.
    """
    labelled = [case for case in cases if case.label is not None]
    if not labelled:
        raise DataError("no labelled cases to fingerprint: the dataset is empty or has no labels")
    measure = partial(_indexed_fingerprint, labels, samples_per_case, seed)
    results = map_cases(measure, list(enumerate(labelled)), workers, desc="fingerprint", progress=progress)
    per_case = {case.case_id: result for case, result in zip(labelled, results)}
    return _summarise(per_case, labels, channels)


def _indexed_fingerprint(labels: Mapping[int, str], samples: int, seed: int, item: tuple[int, CaseFiles]) -> dict:
    index, case = item
    return case_fingerprint(load_case(case, labels), samples, np.random.default_rng([seed, index]))


def _summarise(per_case: dict[str, dict], labels: Mapping[int, str], channels: Sequence[str]) -> dict:
    spacings = np.array([c["spacing"] for c in per_case.values()])
    cropped = np.array([c["shape_after_crop"] for c in per_case.values()])
    intensities = {
        name: np.concatenate([c["intensities"][i] for c in per_case.values()]) for i, name in enumerate(channels)
    }
    if not any(len(values) for values in intensities.values()):
        raise DataError("no labelled foreground voxel in any case: every label map is all background")
    return {
        "n_cases": len(per_case),
        "channels": list(channels),
        "labels": {str(k): v for k, v in sorted(labels.items())},
        "median_spacing": np.median(spacings, axis=0).tolist(),
        "median_shape_after_crop": np.median(cropped, axis=0).tolist(),
        "median_relative_size_after_crop": float(np.median([c["relative_size_after_crop"] for c in per_case.values()])),
        "foreground_intensity": {name: _intensity_statistics(values) for name, values in intensities.items()},
        "class_frequencies": _class_frequencies(per_case, labels),
        "cases": {case_id: {k: c[k] for k in ("spacing", "shape", "shape_after_crop")}
                  for case_id, c in per_case.items()},
    }


def _intensity_statistics(values: np.ndarray) -> dict[str, float]:
    statistics = {
        "mean": float(values.mean()),
        "std": float(values.std()),
        "median": float(np.median(values)),
        "min": float(values.min()),
        "max": float(values.max()),
    }
    statistics.update({key: float(np.percentile(values, q)) for key, q in PERCENTILES.items()})
    return statistics


def _class_frequencies(per_case: dict[str, dict], labels: Mapping[int, str]) -> dict[str, dict]:
    """Per label: its share of all voxels, and the fraction of cases it appears in."""
    total = sum(sum(c["label_voxels"].values()) for c in per_case.values())
    return {
        str(value): {
            "name": name,
            "voxel_fraction": sum(c["label_voxels"].get(value, 0) for c in per_case.values()) / total,
            "case_fraction": sum(value in c["label_voxels"] for c in per_case.values()) / len(per_case),
        }
        for value, name in sorted(labels.items())
    }
