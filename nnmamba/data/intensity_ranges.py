"""The raw intensity range of a dataset's images per channel, and the check that tells `nnmamba predict`
when an input lies far outside it (a CT model given an MR scan, an MR model given a CT).

A case's range is the 0.5 and 99.5 percentiles of each channel over the whole raw image (labels play no
part: prediction inputs have none). ``prepare`` records each case's range and their span over the
dataset (``dataset_ranges``); the model's prediction record carries that span, and the predictors warn
(``InputRangeWarning``) on an input outside it, naming the file. A warning, not an error: a scan from
another scanner or a tight crop can be unusual and still fine.

The test depends on the channel's scale. CT (a channel named ``CT``, as the plan's normalisation reads
it) is in Hounsfield units, so its ranges compare directly, with a tolerance of half the training
range's width: an MR scan (no air at -1000 HU) or a scan in other units stands out. Every
other channel is z-scored per case, so its scale carries no meaning; only the sign does: magnitude MR
images are non-negative, and a CT given to a model trained on them has air far below zero.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
import numpy as np
import torch

from nnmamba.data.cases import CaseFiles

PERCENTILES = (0.5, 99.5)
# np.percentile sorts its input: a strided subsample keeps a 240 x 240 x 155 volume to ~1 M voxels.
MAX_VOXELS = 1_000_000
# CT: how far outside the training span an input's percentile may lie, as a share of the training width.
CT_TOLERANCE = 0.5
# Other channels: a low percentile below -SIGN_TOLERANCE x the image's own width counts as negative.
SIGN_TOLERANCE = 0.05


class InputRangeWarning(UserWarning):
    """An input's intensities lie far from those of the images the model was trained on."""


def image_ranges(image: torch.Tensor) -> list[list[float]]:
    """[[low, high]] per channel of a [C, *spatial] image: its 0.5 and 99.5 percentiles."""
    ranges = []
    for channel in image:
        values = channel.reshape(-1)
        step = max(1, math.ceil(values.numel() / MAX_VOXELS))
        low, high = np.percentile(values[::step].double().numpy(), PERCENTILES)
        ranges.append([float(low), float(high)])
    return ranges


def dataset_ranges(per_case: Sequence[Sequence[Sequence[float]]], channels: Sequence[str]) -> dict[str, dict]:
    """Per channel, the span over the cases of their low and of their high percentile: {"low": [min, max],
    "high": [min, max]}, from each case's ``image_ranges``."""
    spans = {}
    for index, channel in enumerate(channels):
        lows = [case[index][0] for case in per_case]
        highs = [case[index][1] for case in per_case]
        spans[channel] = {"low": [min(lows), max(lows)], "high": [min(highs), max(highs)]}
    return spans


def range_problems(ranges: Sequence[Sequence[float]], training: Mapping[str, dict]) -> list[str]:
    """What is far from the training span in each channel of an input's ``image_ranges`` (none: [])."""
    problems = []
    for (channel, span), (low, high) in zip(training.items(), ranges):
        seen = f"channel {channel}: intensities {low:.4g} to {high:.4g} (0.5-99.5 percentiles)"
        if channel.casefold() == "ct":
            tolerance = CT_TOLERANCE * (span["high"][1] - span["low"][0])
            outside = not (span["low"][0] - tolerance <= low <= span["low"][1] + tolerance
                           and span["high"][0] - tolerance <= high <= span["high"][1] + tolerance)
            if outside:
                problems.append(f"{seen}, but the training CT images have them in [{span['low'][0]:.4g}, "
                                f"{span['low'][1]:.4g}] and [{span['high'][0]:.4g}, {span['high'][1]:.4g}] HU: "
                                "is this a CT in Hounsfield units?")
            continue
        width = max(high - low, 1e-12)
        trained_negative = span["low"][1] < -SIGN_TOLERANCE * (span["high"][0] - span["low"][1])
        trained_non_negative = span["low"][0] >= -SIGN_TOLERANCE * (span["high"][1] - span["low"][0])
        if trained_non_negative and low < -SIGN_TOLERANCE * width:
            problems.append(f"{seen}, but the training images are non-negative (magnitude MR-like): "
                            "is this another modality (a CT in HU)?")
        elif trained_negative and low >= 0:
            problems.append(f"{seen}, but every training image reaches far below zero: is this another modality?")
    return problems


def warn_if_out_of_range(case: CaseFiles, image: torch.Tensor, training: Mapping[str, dict] | None) -> None:
    """Warn (InputRangeWarning) when a case's raw image [C, *spatial] lies far from the training span;
    bundles made before prepare recorded the span (``training`` None) are not checked."""
    if not training:
        return
    problems = range_problems(image_ranges(image), training)
    if problems:
        names = ", ".join(str(path) for path in case.images.values())
        warnings.warn(f"case {case.case_id} ({names}): " + "; ".join(problems), InputRangeWarning, stacklevel=2)
