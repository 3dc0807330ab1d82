"""Tune results of finished nnMamba mic trials, as the train stage's export reads them, without training:
each points at a real checkpoint of freshly built weights (tests of the export and the registry)."""

from __future__ import annotations

from pathlib import Path

import ray.tune
import torch

from nnmamba.checkpoint import model_from_arch
from pipelines.params import StudySpec, TrialSpec
from pipelines.train import architecture
from pipelines.trial import STATE_FILE

INDEX = {"channels": ["t1", "t1ce", "t2", "flair"], "labels": {"0": "background", "1": "ncr", "2": "ed", "3": "et"}}


def trained(study: StudySpec, root: Path, round_: int, scores: dict[int, float], best_epoch: int = 1,
            prediction: dict | None = None) -> list[ray.tune.Result]:
    """One result per seed of `scores` (seed -> best validation Dice), its checkpoint under
    `root/ray_results/round<round_>-seed<seed>` (fresh weights each round)."""
    results = []
    for seed, score in scores.items():
        arch = architecture(study, INDEX, "nnmamba", "mic")
        checkpoint = root / "ray_results" / f"round{round_}-seed{seed}"
        checkpoint.mkdir(parents=True)
        torch.save({"model": model_from_arch(arch).state_dict()}, checkpoint / STATE_FILE)
        trial = TrialSpec(study=study, backbone="nnmamba", variant="mic", seed=seed, digest="digest",
                          optimizer=study.train.optimizer, storage_path=str(root / "ray_results"),
                          dataset_dir="", train_cases=("a",), val_cases=("b",), init_dir=None, arch=arch,
                          prediction=prediction)
        results.append(ray.tune.Result(metrics={"config": {"trial": trial}, "best_checkpoint_path": str(checkpoint),
                                                "best_val_dice_mean": score, "best_epoch": best_epoch},
                                       checkpoint=None, error=None, path=str(checkpoint)))
    return results
