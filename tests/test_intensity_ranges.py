"""Raw intensity ranges: recorded by prepare, and `nnmamba predict` warns on an input of another modality.

The AMOS phantoms give real CT (HU, air at -1000) and magnitude MR cases; the warning must flag each
for a model trained on the other, and stay silent for unseen cases of the model's own modality.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torchio as tio
from torch import nn

from nnmamba.data.intensity_ranges import (
    InputRangeWarning,
    dataset_ranges,
    image_ranges,
    range_problems,
)
from nnmamba.data.preprocessing.preprocess import DATASET_JSON, load_case, prepare_dataset
from nnmamba.data.readers.amos import read_amos_dataset
from nnmamba.data.readers.brats import find_brats_cases
from nnmamba.data.synthetic.amos import write_synthetic_amos
from nnmamba.data.synthetic.brats import write_synthetic_brats
from nnmamba.predict import predict_cases

CASES = {"CT": {"imagesTr": 4, "imagesTs": 2}, "MR": {"imagesTr": 4, "imagesTs": 2}}


@pytest.fixture(scope="module")
def amos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("amos")
    write_synthetic_amos(root, CASES, field_of_view_mm=(120.0, 96.0, 96.0), seed=4)
    return root


def _ranges(case) -> list[list[float]]:
    return image_ranges(load_case(case, label_values=None)["image"].data)


def _span(root: Path, modality: str) -> dict:
    cases = read_amos_dataset(root, modality, ["imagesTr"]).cases
    return dataset_ranges([_ranges(case) for case in cases], [modality])


def _unseen(root: Path, modality: str) -> list:
    return read_amos_dataset(root, modality, ["imagesTs"]).cases


def test_a_case_range_is_the_percentiles_of_the_whole_image() -> None:
    small = torch.randn(2, 20, 30, 10) * torch.tensor([1.0, 300.0])[:, None, None, None]
    expected = [np.percentile(c.numpy().astype(np.float64), [0.5, 99.5]).tolist() for c in small]
    assert np.allclose(image_ranges(small), expected, rtol=1e-12, atol=0)
    # A BraTS-size channel is subsampled: the percentiles stay within a small share of the width.
    large = torch.from_numpy(np.random.default_rng(0).gamma(2.0, 100.0, (1, 240, 240, 155)).astype(np.float32))
    low, high = np.percentile(large.numpy(), [0.5, 99.5])
    (sampled_low, sampled_high), = image_ranges(large)
    assert abs(sampled_low - low) < 0.01 * (high - low) and abs(sampled_high - high) < 0.01 * (high - low)


def test_the_dataset_span_is_the_extremes_of_the_case_ranges() -> None:
    per_case = [[[0.0, 10.0], [-5.0, 3.0]], [[1.0, 12.0], [-7.0, 2.0]]]
    assert dataset_ranges(per_case, ["t1", "CT"]) == {
        "t1": {"low": [0.0, 1.0], "high": [10.0, 12.0]}, "CT": {"low": [-7.0, -5.0], "high": [2.0, 3.0]}}


@pytest.mark.parametrize("trained, given", [("CT", "MR"), ("MR", "CT")])
def test_another_modality_is_flagged_and_unseen_cases_of_the_same_are_not(amos: Path, trained: str,
                                                                          given: str) -> None:
    span = _span(amos, trained)
    for case in _unseen(amos, trained):
        assert range_problems(_ranges(case), span) == []
    for case in _unseen(amos, given):
        problems = range_problems(_ranges(case), span)
        assert len(problems) == 1 and problems[0].startswith(f"channel {trained}: intensities ")


def test_brats_channels_pass_their_own_span_and_flag_a_ct_like_shift(tmp_path: Path) -> None:
    write_synthetic_brats(tmp_path, 4, shape=(32, 32, 24), seed=3)
    cases = find_brats_cases(tmp_path)
    channels = list(cases[0].images)
    span = dataset_ranges([_ranges(case) for case in cases[:3]], channels)
    assert range_problems(_ranges(cases[3]), span) == []
    shifted = load_case(cases[3], label_values=None)["image"].data.clone()
    shifted[1] -= 1000.0   # one channel in a signed, CT-like scale
    problems = range_problems(image_ranges(shifted), span)
    assert len(problems) == 1 and problems[0].startswith(f"channel {channels[1]}:") and "non-negative" in problems[0]


def test_prepare_records_each_case_range_and_the_dataset_span(amos: Path, tmp_path: Path) -> None:
    cases = read_amos_dataset(amos, "MR", ["imagesTr"]).cases
    index = prepare_dataset(cases, tmp_path / "prepared", label_values=None, crop_margin=2, progress=False)
    assert json.loads((tmp_path / "prepared" / DATASET_JSON).read_text())["intensity_ranges"] == index["intensity_ranges"]
    for case in cases:
        volume = tio.ScalarImage(case.images["MR"]).data[0].numpy().astype(np.float64)
        assert np.allclose(index["cases"][case.case_id]["intensity_range"], [np.percentile(volume, [0.5, 99.5])],
                           rtol=1e-9, atol=0)
    assert index["intensity_ranges"] == dataset_ranges(
        [index["cases"][c.case_id]["intensity_range"] for c in cases], ["MR"])


def _record(channel: str, span: dict) -> dict:
    return {"task": "segmentation", "channels": [channel], "labels": {"0": "background", "1": "organ"},
            "patch_size": [16, 16, 8], "overlap": 0.25, "intensity_ranges": span,
            "plan": {"normalization": [{"channel": channel, "scheme": "zscore"}], "target_spacing": None,
                     "image_interpolation": "linear", "crop_margin": 2}}


def test_predict_warns_with_the_file_and_still_writes_the_labels(amos: Path, tmp_path: Path) -> None:
    model = nn.Conv3d(1, 2, 1)
    record = _record("CT", _span(amos, "CT"))
    mr_case = _unseen(amos, "MR")[0]
    with pytest.warns(InputRangeWarning, match=rf"case {mr_case.case_id} \(.*{mr_case.images['MR'].name}\): "
                                               r"channel CT: .* is this a CT in Hounsfield units\?"):
        written = predict_cases(model, record, [mr_case], tmp_path / "mr", device="cpu", progress=False)
    assert [p.name for p in written] == [f"{mr_case.case_id}.nii.gz"] and written[0].is_file()
    with warnings.catch_warnings():
        warnings.simplefilter("error", InputRangeWarning)
        predict_cases(model, record, _unseen(amos, "CT"), tmp_path / "ct", device="cpu", progress=False)
        # A bundle from before prepare recorded the span is not checked.
        old = {key: value for key, value in record.items() if key != "intensity_ranges"}
        predict_cases(model, old, [mr_case], tmp_path / "old", device="cpu", progress=False)
