"""params.yaml resolution: profiles, study overrides, and the paper profile's settings."""

import pytest
import yaml

from pipelines.config import REPO_ROOT, deep_merge, load_params, study_config


def write_params(tmp_path, params):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def test_deep_merge_replaces_leaves_and_lists_but_keeps_siblings():
    base = {"train": {"lr": 1, "patch": [1, 2], "aug": {"flip": 0.5, "noise": 0.1}}, "keep": 1}
    merged = deep_merge(base, {"train": {"patch": [3], "aug": {"flip": 0.0}}})
    assert merged == {"train": {"lr": 1, "patch": [3], "aug": {"flip": 0.0, "noise": 0.1}}, "keep": 1}
    assert base["train"]["patch"] == [1, 2]


def test_unknown_profile_is_a_clear_error(tmp_path):
    path = write_params(tmp_path, {"profile": "papr", "profiles": {"paper": {}}})
    with pytest.raises(KeyError, match="profile 'papr' is not defined"):
        load_params(path)


def test_study_sections_merge_shared_then_study_then_profile(tmp_path):
    params = {
        "profile": "big",
        "train": {"epochs": 3, "lr": 0.1},
        "evaluate": {"overlap": 0.5},
        "studies": {"s": {"task": "segmentation", "init": "nnmamba/models.py", "dataset": {"name": "d"},
                          "train": {"epochs": 5}}},
        "profiles": {"big": {"train": {"lr": 0.2}, "studies": {"s": {"train": {"epochs": 50}}}}},
    }
    config = study_config("s", load_params(write_params(tmp_path, params)))
    assert config["train"] == {"epochs": 50, "lr": 0.2}
    assert config["evaluate"] == {"overlap": 0.5}
    assert config["task"] == "segmentation" and config["study"] == "s"
    with pytest.raises(KeyError, match="study 'nope'"):
        study_config("nope", load_params(write_params(tmp_path, params)))


def test_paper_profile_has_the_papers_settings(tmp_path):
    params = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    params["profile"] = "paper"
    config = study_config("brats2023", load_params(write_params(tmp_path, params)))
    train = config["train"]
    assert train["optimizer"] == {"name": "adam", "lr": 0.002, "weight_decay": 0.001}
    assert train["batch_size"] == 2 and train["epochs"] == 1000 and train["patch_size"] == [128, 128, 128]
    assert config["split"]["val"] == 125 and config["split"]["test"] == 251
    assert config["model"]["base_channels"] == 32
    assert config["ray"]["use_gpu"] is True

