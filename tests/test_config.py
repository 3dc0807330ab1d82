"""params.yaml parsed into typed specs: profiles, study overrides, errors that name the key, the paper profile."""

import pytest
import yaml

from nnmamba.backbones import BACKBONES, get_backbone
from pipelines.params import ParamsError, deep_merge, load_params
from pipelines.workspace import REPO_ROOT


def write_params(tmp_path, params):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def test_deep_merge_replaces_leaves_and_lists_but_keeps_siblings():
    base = {"train": {"lr": 1, "patch": [1, 2], "aug": {"flip": 0.5, "noise": 0.1}}, "keep": 1}
    merged = deep_merge(base, {"train": {"patch": [3], "aug": {"flip": 0.0}}})
    assert merged == {"train": {"lr": 1, "patch": [3], "aug": {"flip": 0.0, "noise": 0.1}}, "keep": 1}
    assert base["train"]["patch"] == [1, 2]


def real_params() -> dict:
    return yaml.safe_load((REPO_ROOT / "params.yaml").read_text())


def test_unknown_profile_is_a_clear_error(tmp_path):
    params = {**real_params(), "profile": "papr"}
    with pytest.raises(ParamsError, match="profile 'papr' is not defined.*did you mean 'paper'"):
        load_params(write_params(tmp_path, params))


def test_study_sections_merge_shared_then_study_then_profile(tmp_path):
    params = real_params()
    params["profile"] = "big"
    params["train"]["epochs"] = 3
    params["studies"]["brats2023"]["train"] = {"epochs": 5}
    params["profiles"]["big"] = {"train": {"steps_per_epoch": 9},
                                 "studies": {"brats2023": {"train": {"epochs": 50}}}}
    loaded = load_params(write_params(tmp_path, params))
    study = loaded.study("brats2023")
    assert study.train.epochs == 50 and study.train.steps_per_epoch == 9
    assert study.train.seeds == tuple(params["train"]["seeds"])
    assert study.task == "segmentation" and study.name == "brats2023"
    with pytest.raises(ParamsError, match="study 'brats2032' is not defined.*did you mean 'brats2023'"):
        loaded.study("brats2032")


def test_specs_are_frozen_and_typed():
    study = load_params().study("brats2023")
    assert study.train.patch_size == (32, 32, 32) and study.train.augmentation.flip_axes == (0, 1, 2)
    with pytest.raises(ValueError, match="frozen"):
        study.train.epochs = 1


@pytest.mark.parametrize(("edit", "message"), [
    # a misspelt key is named where it was written, with the close match
    (lambda p: p["train"].update(epcohs=3), r"train\.epcohs: unknown key; did you mean 'epochs'"),
    (lambda p: p["studies"]["amos_ct"]["train"].update(epcohs=3),
     r"studies\.amos_ct\.train\.epcohs: unknown key; did you mean 'epochs'"),
    (lambda p: p["profiles"]["paper"]["train"].update(epcohs=3) or p.update(profile="paper"),
     r"profiles\.paper\.train\.epcohs: unknown key"),
    (lambda p: p["studies"]["brats2023"].update(trian={}), r"studies\.brats2023\.trian: unknown key; did you mean 'train'"),
    (lambda p: p["train"]["augmentation"].update(flip_pp=1), r"train\.augmentation\.flip_pp: unknown key; did you mean 'flip_p'"),
    (lambda p: p["ray"].update(max_failure=1), r"ray\.max_failure: unknown key; did you mean 'max_failures'"),
    (lambda p: p.update(reprot={}), r"reprot: unknown key; did you mean 'report'"),
    # wrong types, missing keys, unknown names
    (lambda p: p["train"].update(epochs="three"), r"train\.epochs: Input should be a valid integer.*'three'"),
    (lambda p: p["train"].update(amp="bf32"), r"train\.amp: Input should be 'none', 'bf16' or 'fp16'"),
    (lambda p: p["model"].pop("d_state"), r"model\.d_state: missing key"),
    (lambda p: p["studies"]["brats2023"].update(task="segmentaton"), r"unknown task 'segmentaton'; did you mean 'segmentation'"),
    (lambda p: p["ray"].update(preset="gpu1"), r"ray\.preset 'gpu1' has no file.*did you mean 'gpu-1'"),
    (lambda p: p["studies"]["brats2023"].update(train={"backbones": ["nnmamba", "segresnt"]}),
     r"study brats2023: train\.backbones: unknown segmentation backbone 'segresnt'; did you mean 'segresnet'"),
    (lambda p: p["train"].update(backbones=["nnformer"]), r"'nnformer' is not available: no maintained package"),
])
def test_bad_params_name_the_key_the_file_and_close_matches(tmp_path, edit, message):
    params = real_params()
    edit(params)
    path = write_params(tmp_path, params)
    with pytest.raises(ParamsError, match=message) as raised:
        load_params(path)
    assert str(path) in str(raised.value)


def test_paper_profile_has_the_papers_settings(tmp_path):
    params = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    params["profile"] = "paper"
    study = load_params(write_params(tmp_path, params)).study("brats2023")
    train = study.train
    assert train.optimizer.model_dump(exclude_defaults=True) == {"name": "adam", "lr": 0.002, "weight_decay": 0.001}
    assert train.batch_size == 2 and train.epochs == 1000 and train.patch_size == (128, 128, 128)
    assert study.split.val == 125 and study.split.test == 251
    assert study.model.base_channels == 32
    assert study.ray.use_gpu is True



def test_each_backbone_trains_with_its_own_recipe_unless_shared(tmp_path):
    params = real_params()
    params["studies"]["brats2023"]["train"] = {"backbones": ["nnmamba", "unetr", "vnet", "segresnet", "nnunet"],
                                              "backbone_optimizers": {"segresnet": {"name": "adam", "lr": 0.01,
                                                                                    "weight_decay": 0.0}}}
    train = load_params(write_params(tmp_path, params)).study("brats2023").train
    own = {b: train.optimizer_for("segmentation", b).model_dump(exclude_defaults=True) for b in train.backbones}
    assert own["nnmamba"] == own["vnet"] == {"name": "adam", "lr": 0.002, "weight_decay": 0.001}  # VNet: none published
    assert own["unetr"] == {"name": "adamw", "lr": 1e-4, "weight_decay": 1e-5}                     # MONAI's BTCV recipe
    assert own["segresnet"] == {"name": "adam", "lr": 0.01, "weight_decay": 0.0}                   # overridden
    assert own["nnunet"] == {"name": "sgd", "lr": 0.01, "weight_decay": 3e-5, "momentum": 0.99,    # nnUNetTrainer's
                             "nesterov": True, "schedule": "poly"}
    losses = {b: train.loss_for("segmentation", b) for b in train.backbones}
    assert losses == {"nnmamba": "dice_ce", "unetr": "dice_ce", "vnet": "dice_ce", "segresnet": "dice",
                      "nnunet": "dice_ce"}
    assert train.loss_for("segmentation", "segmamba") == "ce"                                      # SegMamba's CE alone
    assert train.loss_for("classification", "resnet") is None
    params["studies"]["brats2023"]["train"]["backbone_losses"] = {"segresnet": "ce"}
    assert load_params(write_params(tmp_path, params)).study("brats2023").train.loss_for("segmentation",
                                                                                          "segresnet") == "ce"
    params["studies"]["brats2023"]["train"]["recipe"] = "shared"
    shared = load_params(write_params(tmp_path, params)).study("brats2023").train
    assert {shared.optimizer_for("segmentation", b).lr for b in shared.backbones} == {0.002}
    assert {shared.loss_for("segmentation", b) for b in (*shared.backbones, "segmamba")} == {"dice_ce"}
    params["studies"]["brats2023"]["train"]["backbone_losses"] = {"segresnet": "focal"}
    with pytest.raises(ParamsError, match="focal"):
        load_params(write_params(tmp_path, params))


def test_benchmark_profile_runs_every_available_backbone_where_its_input_fits(tmp_path):
    params = real_params()
    params["profile"] = "benchmark"
    studies = load_params(write_params(tmp_path, params)).studies
    ran = {b for study in studies.values() for b in study.train.backbones}
    assert ran == {b for task in BACKBONES.values() for b in task} | {"nnmamba"}
    for study in studies.values():
        shape = study.prepare.shape if study.task == "classification" else study.train.patch_size
        if shape != "auto":  # planned patches are checked by train@<study> once the plan exists
            for backbone in set(study.train.backbones) - {"nnmamba"}:
                get_backbone(study.task, backbone).check_input(shape)


def test_sgd_settings_on_another_optimizer_are_refused(tmp_path):
    params = real_params()
    params["train"]["optimizer"] = {"name": "adam", "lr": 0.002, "weight_decay": 0.001, "nesterov": True}
    with pytest.raises(ParamsError, match="nesterov are SGD settings"):
        load_params(write_params(tmp_path, params))
