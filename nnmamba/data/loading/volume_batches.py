"""Whole-volume batches for classification: each augmented volume with its class index, sharded over ranks."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torchio as tio

from nnmamba.data.loading.augmentation import Augmentation, augmentation_transform
from nnmamba.data.loading.sampling import PrivateRngLoader, SubjectGroups, groups_per_pass, rank_shard


def make_volume_loader(
    image_paths: Sequence[Path],
    targets: Sequence[int],
    case_ids: Sequence[str],
    batch_size: int,
    augmentation: Augmentation,
    num_workers: int,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    pin_memory: bool = False,
) -> PrivateRngLoader:
    """Shuffled batches of whole augmented volumes with their class index, this rank's cases only.

    Ranks take the cases round robin (``rank_shard``). Each pass deals the rank's cases into full
    batches (``SubjectGroups``: the last one is topped up with cases drawn again), so a CUDA-graph
    step, which needs one batch shape, never meets a short last batch, and every rank has
    ``groups_per_pass`` batches per pass. Batches are ``collate_volumes``'s.
    """
    if not len(image_paths) == len(targets) == len(case_ids):
        raise ValueError(f"{len(image_paths)} images, {len(targets)} targets and {len(case_ids)} case ids")
    mine = rank_shard(list(zip(image_paths, targets, case_ids, strict=True)), rank, world_size)
    subjects = [tio.Subject(image=tio.ScalarImage(image), target=target, case_id=case_id)
                for image, target, case_id in mine]
    dataset = tio.SubjectsDataset(subjects, transform=augmentation_transform(augmentation))
    batches = SubjectGroups(len(mine), batch_size, groups_per_pass(len(case_ids), batch_size, world_size))
    return PrivateRngLoader(dataset, seed=seed, rank=rank, batch_sampler=batches, num_workers=num_workers,
                            collate_fn=collate_volumes, pin_memory=pin_memory)


def collate_volumes(subjects: list[tio.Subject]) -> dict[str, Any]:
    """``image`` float32 [B, C, D, H, W], ``label`` int64 [B] (class indices), ``case_id`` list of str."""
    return {
        "image": torch.stack([s["image"].data for s in subjects]).to(torch.float32),
        "label": torch.tensor([s["target"] for s in subjects], dtype=torch.int64),
        "case_id": [s["case_id"] for s in subjects],
    }
