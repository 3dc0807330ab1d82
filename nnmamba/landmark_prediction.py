"""Landmarks of raw images with a trained landmark model: the model's own preprocessing, world mm out.

A landmark bundle's ``prediction.json`` (``nnmamba.checkpoint``) carries the spacing and crop margin
the model was trained with. A raw case is read and validated as in training (``load_case``),
preprocessed as ``prepare`` did (``preprocess_landmark_case``), and its sliding-window heatmaps are
decoded to RAS world points in mm. No mapping back is needed: the preprocessed image's affine maps
its voxels to the same world mm as the raw scan's. Each case's points go to ``<case>.json`` in the
landmarks layout that ``read_landmarks`` reads (the annotations' format).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from nnmamba.atomic import staged
from nnmamba.data.cases import CaseFiles
from nnmamba.data.preprocessing.landmarks import preprocess_landmark_case
from nnmamba.data.intensity_ranges import warn_if_out_of_range
from nnmamba.data.preprocessing.preprocess import load_case
from nnmamba.data.readers.landmarks import landmarks_json
from nnmamba.inference import predict_landmarks


def locate_case(model: nn.Module, case: CaseFiles, record: dict, device: torch.device | str | None = None,
                mirror_axes: Sequence[int] = (), overlap: float | None = None) -> dict[str, list[float]]:
    """Landmark name -> [x, y, z] RAS world mm of one raw case."""
    raw = load_case(case, label_values=None)
    warn_if_out_of_range(case, raw["image"].data, record.get("intensity_ranges"))
    image, _ = preprocess_landmark_case(raw, record["spacing"], record["crop_margin"])
    points = predict_landmarks(model, image.data, image.affine, record["patch_size"],
                               overlap=record["overlap"] if overlap is None else overlap, mirror_axes=mirror_axes,
                               device=device)
    return {name: [float(v) for v in point] for name, point in zip(record["landmarks"], points)}


def locate_cases(model: nn.Module, record: dict, cases: Sequence[CaseFiles], output_dir: Path,
                 device: torch.device | str | None = None, mirror_axes: Sequence[int] = (),
                 overlap: float | None = None, progress: bool = True) -> list[Path]:
    """Every case's landmarks into ``output_dir/<case>.json``; a file appears only once fully written."""
    output_dir = Path(output_dir)
    written = []
    for case in tqdm(cases, desc="locate", unit="case", disable=not progress):
        points = locate_case(model, case, record, device, mirror_axes, overlap)
        with staged() as staging:
            staging.file(output_dir / f"{case.case_id}.json", landmarks_json(points))
        written.append(output_dir / f"{case.case_id}.json")
    return written
