"""Splits of datasets that ship their own folders (AMOS imagesTr/imagesVa/imagesTs) and of partly unlabelled ones."""

from __future__ import annotations

import pytest
import yaml

from nnmamba.data.errors import DataError
from nnmamba.data.splits import split_cases
from pipelines.params import load_params
from pipelines.workspace import REPO_ROOT


def _index(cases: dict[str, tuple[str | None, bool]]) -> dict:
    return {"cases": {case_id: {"subset": subset, "label": f"labels/{case_id}.nii.gz" if labelled else None}
                      for case_id, (subset, labelled) in cases.items()}}


AMOS = _index({"amos_0001": ("train", True), "amos_0002": ("train", True), "amos_0003": ("val", True),
               "amos_0004": ("test", False), "amos_0005": ("test", False)})


def test_folders_map_onto_train_val_test() -> None:
    split = split_cases(AMOS, lambda c: c, "folders", val=5, test=0, seed=0)
    assert split == {"train": ["amos_0001", "amos_0002"], "val": ["amos_0003"], "test": ["amos_0004", "amos_0005"]}


def test_validation_is_drawn_from_train_when_the_dataset_has_no_val_folder() -> None:
    index = _index({f"case_{i}": ("train", True) for i in range(6)} | {"case_9": ("test", False)})
    split = split_cases(index, lambda c: c, "folders", val=2, test=0, seed=1)
    assert split["test"] == ["case_9"] and len(split["val"]) == 2 and len(split["train"]) == 4
    assert sorted(split["train"] + split["val"]) == [f"case_{i}" for i in range(6)]
    assert split == split_cases(index, lambda c: c, "folders", val=2, test=0, seed=1)


def test_bad_requests_are_named() -> None:
    brats = _index({"BraTS-1": (None, True), "BraTS-2": (None, True)})
    with pytest.raises(DataError, match="needs a dataset that assigns splits .* case BraTS-1 has none"):
        split_cases(brats, lambda c: c, "folders", val=1, test=0, seed=0)
    with pytest.raises(DataError, match="case amos_0004 has no label"):
        split_cases(AMOS, lambda c: c, "random", val=1, test=1, seed=0)
    points_only = _index({f"fetal_{i}": (None, False) for i in range(4)})  # landmark cases: points, no label map
    assert len(split_cases(points_only, lambda c: c, "random", val=1, test=1, seed=0,
                           require_labels=False)["train"]) == 2
    with pytest.raises(ValueError, match="unknown split.method 'loocv'"):
        split_cases(AMOS, lambda c: c, "loocv", val=1, test=1, seed=0)


def test_paper_profile_uses_the_amos_folders_and_the_papers_training(tmp_path) -> None:
    params = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    params["profile"] = "paper"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    for study, modality in (("amos_ct", "CT"), ("amos_mr", "MR")):
        spec = load_params(tmp_path / "params.yaml").study(study)
        assert spec.dataset.reader == {"modality": modality, "subsets": ["imagesTr", "imagesVa", "imagesTs"]}
        assert spec.split.method == "folders"
        assert spec.train.epochs == 1000 and spec.train.patch_size == "auto"
        assert spec.train.optimizer.model_dump(exclude_defaults=True) == {"name": "adam", "lr": 0.002, "weight_decay": 0.001}
