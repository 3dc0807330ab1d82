"""Fold ensembles: the mean of the members' logits (as nnunetv2 averages folds), bundles that cannot be
averaged refused, and the evaluate stage's grouping of a k-fold study's trials."""

from __future__ import annotations

import pytest
import torch

from nnmamba.checkpoint import save_bundle
from nnmamba.ensemble import FoldEnsemble, load_models
from nnmamba.models import build_model
from pipelines.evaluate import fold_ensembles


def _bundle(directory, seed: int, out_channels: int = 3):
    torch.manual_seed(seed)
    model = build_model("segmentation", "baseline", 1, out_channels, base_channels=4, blocks_per_stage=1)
    arch = {"task": "segmentation", "backbone": "nnmamba", "variant": "baseline", "in_channels": 1,
            "out_channels": out_channels, "input_shape": [16, 16, 16],
            "kwargs": {"base_channels": 4, "blocks_per_stage": 1}}
    save_bundle(directory, arch, model.state_dict())
    return model.eval()


def test_the_ensemble_predicts_the_mean_of_its_folds_logits(tmp_path):
    members = [_bundle(tmp_path / f"fold{k}", seed=k) for k in range(3)]
    ensemble, arch = load_models([tmp_path / f"fold{k}" for k in range(3)])
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        expected = sum(member(x) for member in members) / 3
        torch.testing.assert_close(ensemble(x), expected)
    assert isinstance(ensemble, FoldEnsemble) and not ensemble.training and arch["variant"] == "baseline"


def test_one_bundle_loads_as_itself_and_mismatched_bundles_are_refused(tmp_path):
    _bundle(tmp_path / "a", 0)
    _bundle(tmp_path / "b", 1, out_channels=4)
    single, _ = load_models([tmp_path / "a"])
    assert not isinstance(single, FoldEnsemble)
    with pytest.raises(ValueError, match=r"b cannot join an ensemble with .*a: its out_channels is 4, not 3"):
        load_models([tmp_path / "a", tmp_path / "b"])


def test_each_row_and_seed_with_several_folds_becomes_one_ensemble():
    trials = [{"variant": v, "seed": s, "fold": f, "model_dir": f"models/{v}-seed{s}-fold{f}"}
              for v in ("miccss", "nnunet") for s in (0, 1) for f in (1, 0)]
    ensembles = fold_ensembles(trials + [{"variant": "vnet", "seed": 0, "fold": 0, "model_dir": "models/vnet"}])
    assert [(e["variant"], e["seed"]) for e in ensembles] == [("miccss", 0), ("miccss", 1), ("nnunet", 0), ("nnunet", 1)]
    assert ensembles[0]["model_dirs"] == ["models/miccss-seed0-fold0", "models/miccss-seed0-fold1"]
    assert fold_ensembles([{"variant": "miccss", "seed": 0, "fold": None, "model_dir": "m"}]) == []
