"""Training patches: label-weighted draws, augmentation, batches made in loader workers, sharded over ranks.

Layout-agnostic: any number of channels, any label set. Segmentation patches come from
memory-mapped unpacked cases and are augmented patch by patch (:mod:`nnmamba.data.loading.array_patches`);
landmark heatmap patches are drawn by :class:`ContainingLabelSampler` from whole volumes augmented
by torchio (:mod:`nnmamba.data.loading.heatmap_sampling`). Both are batched in the loader's worker
processes and dealt to DDP ranks by :class:`PatchBatchLoader`.
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Callable, Iterator
from functools import partial
from itertools import islice
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
import torchio as tio
from torch.utils.data import DataLoader, Dataset, Sampler, get_worker_info

from nnmamba.data.loading.array_patches import ArrayPatchDataset
from nnmamba.data.loading.augmentation import Augmentation
from nnmamba.data.loading.unpacked import default_unpacked_dir
from nnmamba.data.loading.worker_buffers import GROUPS_AHEAD, worker_batch_buffers

T = TypeVar("T")
# How a batch's tensors are stacked: stack(field name, tensors, dtype).
Stack = Callable[[str, list[torch.Tensor], torch.dtype], torch.Tensor]
# A group's batch from its patches, its tensors made by the given Stack.
Collate = Callable[[list[tio.Subject], Stack], dict[str, Any]]


class ContainingLabelSampler(tio.LabelSampler):
    """LabelSampler that can choose any voxel, borders included (nnU-Net's rule).

    torchio's LabelSampler centres the patch on the chosen voxel, so voxels
    within half a patch of the border are never chosen: foreground lying only
    there is never oversampled, or raises "Empty probability map" when only
    foreground is asked for. Here every voxel is eligible and the patch is
    shifted to stay inside the (padded) volume while still containing it.
    Overrides torchio's sampling hooks; the probability rules are unchanged.
    """

    def get_probability_map(self, subject: tio.Subject) -> torch.Tensor:
        label_map = self.get_probability_map_image(subject).data
        if self.label_probabilities_dict is None:
            return label_map > 0
        return voxel_probabilities(label_map, self.label_probabilities_dict)

    @staticmethod
    def clear_probability_borders(probability_map: np.ndarray, patch_size: np.ndarray) -> None:
        """Keep border voxels eligible (torchio zeroes them)."""

    def get_random_index_ini(self, probability_map: np.ndarray, cdf: np.ndarray) -> np.ndarray:
        chosen = self.sample_probability_map(probability_map, cdf)
        highest_start = np.asarray(probability_map.shape) - self.patch_size
        return np.clip(chosen - self.patch_size // 2, 0, highest_start)


def voxel_probabilities(label_map: torch.Tensor, label_probabilities: dict[int, float]) -> torch.Tensor:
    """Each voxel's (unnormalised) chance to be drawn: its label's probability shared by that label's voxels.

    torchio's rule (labels absent from the volume drop out; the sampler normalises the map),
    computed with one histogram and one table lookup, where torchio's own version builds a
    float copy of the label map and a mask per label.
    """
    if label_map.shape[0] != 1:
        raise ValueError(f"label-weighted sampling needs a one-channel label map, got {label_map.shape[0]} channels")
    codes = label_map.long()
    counts = torch.bincount(codes.flatten())
    table = torch.zeros(len(counts), dtype=torch.float64)
    for label, probability in label_probabilities.items():
        if 0 <= label < len(counts) and counts[label] > 0:
            table[label] = probability / counts[label]
    return table[codes]


def make_patch_loader(
    image_paths: list[Path],
    label_paths: list[Path],
    patch_size: tuple[int, int, int],
    batch_size: int,
    samples_per_volume: int,
    queue_length: int,
    label_probabilities: dict[int, float] | None,
    augmentation: Augmentation,
    num_workers: int,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    pin_memory: bool = False,
    unpacked_dir: Path | None = None,
    image_dtype: torch.dtype = torch.float32,
    passes: int | None = 1,
) -> PatchBatchLoader:
    """Loader of patch batches for one DDP rank (``pin_memory``: page-locked batches, for asynchronous copies to a GPU).

    Batches are dicts: ``image`` [B, C, *patch_size] as ``image_dtype``, ``label``
    uint8 [B, 1, *patch_size] (int32 with labels above 255; the training step widens
    it on the device), ``location`` int64 [B, 6] (patch start and stop voxel in
    the padded volume) and ``case_id`` (list of str). Training with autocast passes
    its dtype as ``image_dtype``: the network's first convolution casts its input
    to it anyway, so the loss is the same and a batch crosses from the workers to
    the GPU in under half the bytes, which is what bounded the loader's rate. Spatial axes keep the
    on-disk voxel order. ``label_probabilities`` weighs the label of the voxel a
    patch is drawn around (``None``: always a nonzero label); the patch
    contains that voxel and is centred on it unless it is near the border.
    Cases are read from their unpacked copies in ``unpacked_dir`` (default:
    ``default_unpacked_dir()``), made on first use.

    An epoch is one pass over the rank's cases in groups of ``batch_size``: every case gives
    ``samples_per_volume`` patches, and each batch holds one patch of each case of a group
    (see :class:`PatchBatchLoader`). Every batch is full and every rank yields the same number
    of batches per epoch, so CUDA graphs keep their shapes and DDP collectives stay in step.
    The loader makes ``passes`` epochs; ``None`` makes them without end, for training loops of
    fixed-step epochs, so that the workers keep fetching across the end of a pass (see
    :class:`SubjectGroups`).
    """
    if len(image_paths) != len(label_paths):
        raise ValueError(f"{len(image_paths)} images but {len(label_paths)} labels")
    cases = [(case_id_of(Path(image)), Path(image), Path(label))
             for image, label in rank_shard(list(zip(image_paths, label_paths, strict=True)), rank, world_size)]
    dataset = ArrayPatchDataset(cases, unpacked_dir or default_unpacked_dir(), patch_size, samples_per_volume,
                                label_probabilities, augmentation)
    return patch_batch_loader(dataset, len(image_paths), partial(collate_patches, image_dtype=image_dtype),
                              batch_size, queue_length, num_workers, seed, rank, world_size, pin_memory, passes)


class PrivateRngLoader(DataLoader):
    """DataLoader whose randomness comes from its own seeded stream, not the caller's.

    torchio (patch centres, augmentation), the subject shuffling and the loader's
    worker seeds all draw from the global torch RNG. Swapping in a
    private RNG state around every fetch makes the batch sequence depend only on
    the seed, not on what the model (initialisation, dropout) draws in between:
    two runs, or two ablation variants with the same seed, see the same patches.
    """

    def __init__(self, dataset: Dataset, seed: int, rank: int = 0, **kwargs: Any):
        """One stream per (seed, DDP rank): each worker draws its own patches, reproducibly."""
        super().__init__(dataset, **kwargs)
        rank_seed = int(np.random.SeedSequence([seed, rank]).generate_state(1)[0])
        self._rng_state = torch.Generator().manual_seed(rank_seed).get_state()

    def __iter__(self) -> Iterator[dict[str, Any]]:
        batches = self._with_private_rng(super().__iter__)
        while True:
            try:
                batch = self._with_private_rng(lambda: next(batches))
            except StopIteration:
                return
            yield batch

    def _with_private_rng(self, fetch: Callable[[], T]) -> T:
        caller_state = torch.get_rng_state()
        torch.set_rng_state(self._rng_state)
        try:
            return fetch()
        finally:
            self._rng_state = torch.get_rng_state()
            torch.set_rng_state(caller_state)


class PatchDrawingDataset(tio.SubjectsDataset):
    """SubjectsDataset whose items are a subject's drawn patches instead of the whole subject.

    Loading, padding, augmentation and the label-weighted draw of ``samples_per_volume``
    patches all run in the loader worker that fetches the item. torchio's Queue, used before,
    draws patches and collates batches in the main process, one volume after the other: 5.8
    batches/s of BraTS-size volumes with 16 workers, against 10.4 this way
    (benchmarks/results/h200_v3/loader_speed*.json; both overstated by a short warm-up);
    segmentation now uses the faster :class:`~nnmamba.data.loading.array_patches.ArrayPatchDataset`.
    """

    def __init__(self, subjects: list[tio.Subject], transform: tio.Transform, sampler: tio.PatchSampler,
                 samples_per_volume: int):
        super().__init__(subjects, transform=transform)
        self.sampler = sampler
        self.samples_per_volume = samples_per_volume

    def __getitem__(self, index: int) -> list[tio.Subject]:  # type: ignore[override]
        return list(self.sampler(super().__getitem__(index), self.samples_per_volume))


class SubjectGroups(Sampler[list[int]]):
    """Each pass: the subjects shuffled and dealt into ``groups`` groups of ``size``, one group per batch set.

    Groups are always full (the last one is topped up with subjects drawn at random): every
    batch then has the same shape, which a CUDA-graph training step needs, and every DDP rank
    the same number of groups (``groups_per_pass``). Draws from the global torch RNG, which
    ``PrivateRngLoader`` makes private. ``passes=None`` deals passes without end: a DataLoader
    fetches only the groups of its current iteration, so restarting it at every pass leaves
    the workers idle at each pass's end while the GPU waits for the next pass's first groups.
    """

    def __init__(self, subjects: int, size: int, groups: int, passes: int | None = 1):
        if groups * size < subjects:
            raise ValueError(f"{groups} groups of {size} cannot hold {subjects} subjects")
        self.subjects, self.size, self.groups, self.passes = subjects, size, groups, passes

    def __len__(self) -> int:
        if self.passes is None:
            raise TypeError("an endless loader (passes=None) has no length")
        return self.groups * self.passes

    def __iter__(self) -> Iterator[list[int]]:
        for _ in itertools.count() if self.passes is None else range(self.passes):
            top_up = torch.randint(self.subjects, (self.groups * self.size - self.subjects,))
            order = torch.cat([torch.randperm(self.subjects), top_up])
            yield from order.view(self.groups, self.size).tolist()


def groups_per_pass(subjects: int, batch_size: int, world_size: int) -> int:
    """Subject groups per pass on every rank: enough for the largest rank share.

    Equal on all ranks because unequal epoch lengths would leave a DDP rank waiting in an
    all-reduce forever.
    """
    return math.ceil(math.ceil(subjects / world_size) / batch_size)


def plain_stack(name: str, tensors: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """Tensors (of batch field ``name``) stacked along a new first dimension, as ``dtype``."""
    return torch.stack(tensors).to(dtype)


def batches_of_group(drawn: list[list[tio.Subject]], collate: Collate) -> list[dict[str, Any]]:
    """A group's patches as batches: batch j holds the j-th patch of every subject in the group.

    In a loader worker they are stacked straight into the worker's reused shared buffers.
    """
    positions = enumerate(zip(*drawn, strict=True))
    if get_worker_info() is None:
        return [collate(list(patches), plain_stack) for _, patches in positions]
    buffers = worker_batch_buffers()
    turn = buffers.next_turn()
    return [collate(list(patches), partial(buffers.stack, turn, position)) for position, patches in positions]


class PatchBatchLoader(PrivateRngLoader):
    """Batches of patches, drawn and collated in the worker processes, shuffled over a few groups.

    A worker fetches one group (``batch_size`` subjects), draws ``samples_per_volume`` patches
    from each and collates them into ``samples_per_volume`` batches, each with one patch of
    every subject of the group; so the main process only receives finished batches (through
    the worker's reused shared memory, :mod:`nnmamba.data.loading.worker_buffers`, which is why a group
    is copied out as soon as it arrives: into pinned memory by the DataLoader with
    ``pin_memory``, else cloned here). Batches of ``mixed_groups`` consecutive groups are
    shuffled together, as torchio's Queue mixes patches of several volumes. Workers persist
    across epochs.
    """

    def __init__(self, dataset: ArrayPatchDataset | PatchDrawingDataset, groups: SubjectGroups,
                 collate: Collate, mixed_groups: int, num_workers: int,
                 seed: int, rank: int, pin_memory: bool = False):
        super().__init__(dataset, seed=seed, rank=rank, batch_sampler=groups, num_workers=num_workers,
                         collate_fn=partial(batches_of_group, collate=collate), persistent_workers=num_workers > 0,
                         prefetch_factor=GROUPS_AHEAD if num_workers > 0 else None, pin_memory=pin_memory,
                         worker_init_fn=yield_to_the_main_process)
        self.mixed_groups = mixed_groups

    def __len__(self) -> int:
        return len(self.batch_sampler) * self.dataset.samples_per_volume

    def __iter__(self) -> Iterator[dict[str, Any]]:
        groups = super().__iter__()
        # The DataLoader pins only where there is an accelerator; without a copy, clone.
        if self.num_workers > 0 and not (self.pin_memory and torch.cuda.is_available()):
            groups = ([{key: value.clone() if isinstance(value, torch.Tensor) else value for key, value in batch.items()}
                       for batch in group] for group in groups)
        while window := list(islice(groups, self.mixed_groups)):
            batches = [batch for group in window for batch in group]
            order = self._with_private_rng(lambda: torch.randperm(len(batches)).tolist())
            yield from (batches[index] for index in order)


# Niceness of loader workers. With as many workers as cores, the main process (which takes in and
# pins the batches and launches the GPU steps) otherwise waits for a core: on the 16-core H200 host
# 16 workers delivered fewer batches than 8 did, 25.7 vs 30.4 per s, although that benchmark's short
# warm-up favoured more workers (benchmarks/results/h200_v4/short_warmup/loader_speed_reused_shm_7a002a9.json).
WORKER_NICENESS = 10


def yield_to_the_main_process(worker_id: int) -> None:
    """Run this loader worker at a lower priority than the training process (it still gets every idle core)."""
    os.nice(WORKER_NICENESS)


def patch_batch_loader(dataset: ArrayPatchDataset | PatchDrawingDataset, all_subjects: int,
                       collate: Collate, batch_size: int, queue_length: int,
                       num_workers: int, seed: int, rank: int, world_size: int,
                       pin_memory: bool = False, passes: int | None = 1) -> PatchBatchLoader:
    """The loader of one rank's ``dataset`` (its ``rank_shard`` of ``all_subjects``), ``passes`` passes long.

    ``queue_length`` (patches held for mixing, as in torchio's Queue) sets how many groups'
    batches are shuffled together.
    """
    groups = SubjectGroups(len(dataset), batch_size, groups_per_pass(all_subjects, batch_size, world_size), passes)
    mixed_groups = max(1, queue_length // (batch_size * dataset.samples_per_volume))
    return PatchBatchLoader(dataset, groups, collate, mixed_groups, num_workers, seed, rank, pin_memory)


def rank_shard(items: list[T], rank: int, world_size: int) -> list[T]:
    """This rank's disjoint share of items (round robin)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, {world_size})")
    if len(items) < world_size:
        raise ValueError(f"{len(items)} subjects cannot be shared by {world_size} ranks")
    return items[rank::world_size]


def case_id_of(path: Path) -> str:
    """``BraTS-GLI-00000-000.nii.gz`` -> ``BraTS-GLI-00000-000`` (also .nrrd, .mha, ...)."""
    return Path(path.name.removesuffix(".gz")).stem


def collate_patches(patches: list[tio.Subject], stack: Stack = plain_stack,
                    image_dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """Plain tensors instead of torchio's nested per-image dicts; labels keep their compact type."""
    return {
        "image": stack("image", [patch["image"].data for patch in patches], image_dtype),
        "label": stack("label", [patch["label"].data for patch in patches], patches[0]["label"].data.dtype),
        "location": stack("location", [torch.as_tensor(patch[tio.LOCATION]) for patch in patches], torch.int64),
        "case_id": [patch["case_id"] for patch in patches],
    }
