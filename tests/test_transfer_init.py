"""Where a study's trials start: from scratch, or from another study's models of the same variant and seed."""

from __future__ import annotations

import pytest
import torch

from nnmamba.checkpoint import save_bundle
from nnmamba.models import build_model
from pipelines.params import StudySpec, TrialSpec, load_params
from pipelines.train import SCRATCH_INIT, init_fingerprint, init_models
from pipelines.train_worker import _initialise

ARCH = {"task": "classification", "variant": "sequence", "in_channels": 1, "out_channels": 2,
        "kwargs": {"base_channels": 4, "blocks_per_stage": 1}}


def study(init: str, variants=("sequence",), seeds=(0, 1)) -> StudySpec:
    spec = load_params().study("adni_mci")
    return spec.model_copy(update={"init": init, "train": spec.train.model_copy(
        update={"variants": tuple(variants), "seeds": tuple(seeds)})})


def trial(init_dir, arch: dict) -> TrialSpec:
    spec = study(str(init_dir.parent))
    return TrialSpec(study=spec, backbone="nnmamba", variant="sequence", seed=1, digest="d",
                     optimizer=spec.train.optimizer, storage_path="", dataset_dir="", train_cases=(), val_cases=(),
                     init_dir=str(init_dir), arch=arch, prediction=None)


def upstream_models(root, seeds=(0, 1)):
    (root / "trials.json").write_text("{}")
    for seed in seeds:
        torch.manual_seed(seed)
        save_bundle(root / f"sequence-seed{seed}", ARCH, build_model("classification", "sequence", 1, 2,
                                                                      **ARCH["kwargs"]).state_dict())
    return root


def test_scratch_has_no_upstream():
    assert init_models(study(SCRATCH_INIT)) is None and init_fingerprint(study(SCRATCH_INIT)) is None


def test_init_must_be_scratch_or_a_trained_models_folder(tmp_path):
    with pytest.raises(ValueError, match="is neither 'nnmamba/models.py'.*no trials.json"):
        init_models(study(str(tmp_path)))


def test_fingerprint_follows_the_upstream_weights_and_needs_every_trial(tmp_path):
    root = upstream_models(tmp_path)
    before = init_fingerprint(study(str(root)))
    assert before == init_fingerprint(study(str(root)))
    torch.manual_seed(7)
    save_bundle(root / "sequence-seed1", ARCH, build_model("classification", "sequence", 1, 2,
                                                           **ARCH["kwargs"]).state_dict())
    assert init_fingerprint(study(str(root))) != before
    with pytest.raises(ValueError, match="no upstream model for sequence seed 2"):
        init_fingerprint(study(str(root), seeds=(0, 1, 2)))


def test_initialise_loads_the_upstream_weights_and_refuses_another_architecture(tmp_path):
    root = upstream_models(tmp_path)
    torch.manual_seed(123)
    model = build_model("classification", "sequence", 1, 2, **ARCH["kwargs"])
    _initialise(model, trial(root / "sequence-seed1", ARCH))
    saved = torch.load(root / "sequence-seed1" / "model.pt", weights_only=True)
    assert all(torch.equal(value, saved[name]) for name, value in model.state_dict().items())
    other = {**ARCH, "out_channels": 3}
    with pytest.raises(ValueError, match="cannot initialise adni_mci-sequence-seed1-d from .*differs"):
        _initialise(build_model("classification", "sequence", 1, 3, **ARCH["kwargs"]), trial(root / "sequence-seed1", other))
