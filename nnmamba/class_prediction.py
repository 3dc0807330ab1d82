"""Class probabilities of raw images with a trained classifier: the model's own preprocessing, one CSV out.

A classification bundle's ``prediction.json`` (``nnmamba.checkpoint``) carries the spacing and shape
every training volume was brought to. A raw case is read and validated as in training
(``load_case``), preprocessed as ``prepare`` did (``preprocess_volume``: canonical, resampled,
z-scored in the head mask, cropped or padded), and classified whole. All cases go to one
``probabilities.csv``: ``case_id``, ``p_<class>`` per class in the model's order, ``predicted``
(the most probable class's name), the columns of the pipeline's own predictions.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm import tqdm

from nnmamba.atomic import staged
from nnmamba.data.cases import CaseFiles
from nnmamba.data.intensity_ranges import warn_if_out_of_range
from nnmamba.data.preprocessing.preprocess import load_case
from nnmamba.data.preprocessing.whole_volume import preprocess_volume
from nnmamba.inference import class_probabilities

PROBABILITIES_FILE = "probabilities.csv"


def classify_case(model: nn.Module, case: CaseFiles, record: dict, device: torch.device | str | None = None,
                  mirror_axes: Sequence[int] = ()) -> np.ndarray:
    """The class probabilities [K] of one raw case, in the order of ``record["classes"]``."""
    raw = load_case(case, label_values=None)
    warn_if_out_of_range(case, raw["image"].data, record.get("intensity_ranges"))
    volume = preprocess_volume(raw, record["spacing"], record["shape"])
    return class_probabilities(model, volume["image"].data, mirror_axes=mirror_axes, device=device)[0].numpy()


def classify_cases(model: nn.Module, record: dict, cases: Sequence[CaseFiles], output_dir: Path,
                   device: torch.device | str | None = None, mirror_axes: Sequence[int] = (),
                   progress: bool = True) -> list[Path]:
    """Every case's class probabilities as ``output_dir/probabilities.csv``, written once all are known."""
    classes = record["classes"]
    rows = []
    for case in tqdm(cases, desc="classify", unit="case", disable=not progress):
        probabilities = classify_case(model, case, record, device, mirror_axes)
        rows.append({"case_id": case.case_id, **{f"p_{name}": float(p) for name, p in zip(classes, probabilities)},
                     "predicted": classes[int(probabilities.argmax())]})
    target = Path(output_dir) / PROBABILITIES_FILE
    with staged() as staging:
        staging.file(target, pd.DataFrame(rows).to_csv(index=False))
    return [target]
