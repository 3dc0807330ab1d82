"""Training patches: torchio SubjectsDataset + Queue + LabelSampler, sharded over DDP ranks.

Layout-agnostic: any number of channels, any label set. Volumes are padded to
at least the patch size, augmented whole, then patches are drawn with foreground
oversampling (``label_probabilities``) by :class:`ContainingLabelSampler`; all of
it in the queue's worker processes (see :func:`patch_queue`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
import torchio as tio
from torch.utils.data import DataLoader

T = TypeVar("T")

FLIP_KEYS = {"flip_axes": "axes"}
# augmentation probability key -> (torchio transform, {optional key: its keyword}, fixed keywords).
# Absent optional keys keep torchio's defaults; the probability is the transform's p.
RANDOM_TRANSFORMS: dict[str, tuple[type[tio.Transform], dict[str, str], dict[str, Any]]] = {
    # Preprocessed volumes are 0 outside the head, so resampling pads with 0 too.
    "affine_p": (tio.RandomAffine, {"scales": "scales", "degrees": "degrees"}, {"default_pad_value": 0}),
    # Intensity changes touch the network input only (landmark heatmap targets are images too).
    "gamma_p": (tio.RandomGamma, {"log_gamma": "log_gamma"}, {"include": ["image"]}),
    "noise_p": (tio.RandomNoise, {"noise_std": "std"}, {"include": ["image"]}),
}
AUGMENTATION_KEYS = frozenset(
    {"flip_p", *FLIP_KEYS, *RANDOM_TRANSFORMS, *(k for _, keys, _ in RANDOM_TRANSFORMS.values() for k in keys)}
)


def augmentation_transform(augmentation: dict) -> tio.Transform:
    """Random spatial then intensity transforms from a params.yaml ``augmentation`` dict.

    Keys: ``flip_p`` (per-axis flip probability) with ``flip_axes``; ``affine_p``
    with ``scales``, ``degrees``; ``gamma_p`` with ``log_gamma``; ``noise_p`` with
    ``noise_std``. A transform is used only when its probability is > 0, so an
    empty dict is the identity. Unknown keys raise ValueError.
    """
    unknown = sorted(set(augmentation) - AUGMENTATION_KEYS)
    if unknown:
        raise ValueError(f"unknown augmentation key(s) {unknown}; known keys: {sorted(AUGMENTATION_KEYS)}")
    transforms: list[tio.Transform] = []
    if augmentation.get("flip_p", 0) > 0:
        kwargs = _present_keywords(augmentation, FLIP_KEYS)
        transforms.append(tio.RandomFlip(flip_probability=augmentation["flip_p"], **kwargs))
    for probability_key, (transform_type, keys, fixed) in RANDOM_TRANSFORMS.items():
        if augmentation.get(probability_key, 0) > 0:
            kwargs = _present_keywords(augmentation, keys)
            transforms.append(transform_type(p=augmentation[probability_key], **fixed, **kwargs))
    return tio.Compose(transforms)


def _present_keywords(augmentation: dict, keys: dict[str, str]) -> dict[str, Any]:
    """Keywords for the keys present; YAML lists become the tuples torchio expects."""
    return {
        keyword: tuple(augmentation[key]) if isinstance(augmentation[key], list) else augmentation[key]
        for key, keyword in keys.items()
        if key in augmentation
    }


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
    computed with one histogram and one table lookup: torchio's own version builds a float copy
    of the label map and a mask per label, ~0.15 s per BraTS-size volume.
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
    augmentation: dict,
    num_workers: int,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
) -> DataLoader:
    """Loader of patch batches for one DDP rank.

    Batches are dicts: ``image`` float32 [B, C, *patch_size], ``label`` int64
    [B, 1, *patch_size], ``location`` int64 [B, 6] (patch start and stop voxel in
    the padded volume) and ``case_id`` (list of str). Spatial axes keep the
    on-disk voxel order. ``label_probabilities`` weighs the label of the voxel a
    patch is drawn around (``None``: always a nonzero label); the patch always
    contains that voxel and is centred on it unless it is near the border. Every rank yields the same number
    of batches per epoch so DDP collectives stay in step.
    """
    if len(image_paths) != len(label_paths):
        raise ValueError(f"{len(image_paths)} images but {len(label_paths)} labels")
    subjects = _rank_subjects(list(zip(image_paths, label_paths)), samples_per_volume, rank, world_size)
    transform = tio.Compose([tio.CropOrPad(patch_size, only_pad=True), augmentation_transform(augmentation)])
    sampler = ContainingLabelSampler(patch_size, label_name="label", label_probabilities=label_probabilities)
    queue = patch_queue(subjects, transform, sampler, samples_per_volume, queue_length, num_workers)
    return PrivateRngLoader(queue, seed=seed, rank=rank, batch_size=batch_size, collate_fn=collate_patches)


@dataclass
class DrawnPatches:
    """One subject's patches for this pass over the data, drawn in a loader worker.

    ``num_samples`` is the attribute torchio's Queue reads to know how many patches to take.
    """

    patches: list[tio.Subject]
    num_samples: int


class PatchDrawingDataset(tio.SubjectsDataset):
    """SubjectsDataset whose items are a subject's drawn patches instead of the whole subject.

    torchio's Queue draws patches in the main process, one volume after the other: with
    BraTS-size volumes the label-weighted sampler (probability map and CDF over ~9 M voxels,
    then one crop per patch) took ~0.3 s per volume there and capped the loader below the
    GPU's step rate however many workers loaded volumes. Drawn here, in the worker that
    loaded and augmented the subject, it scales with the workers, and only the patches (not
    the volume) cross to the main process.
    """

    def __init__(self, subjects: list[tio.Subject], transform: tio.Transform, sampler: tio.PatchSampler):
        super().__init__(subjects, transform=transform)
        self.sampler = sampler

    def __getitem__(self, index: int) -> DrawnPatches:  # type: ignore[override]
        subject = super().__getitem__(index)
        count = subject["num_samples"]
        return DrawnPatches(list(self.sampler(subject, count)), count)


def hand_out(drawn: DrawnPatches, num_patches: int | None = None) -> Iterator[tio.Subject]:
    """The queue's sampler: yields the pre-drawn patches, each once.

    The queue asks again for a subject whose patches did not all fit; popping makes that
    second call continue with the patches not yet taken.
    """
    while drawn.patches:
        yield drawn.patches.pop(0)


def patch_queue(subjects: list[tio.Subject], transform: tio.Transform, sampler: tio.PatchSampler,
                samples_per_volume: int, queue_length: int, num_workers: int) -> tio.Queue:
    """torchio's Queue (patches of several volumes mixed, subjects and patches shuffled) fed by
    :class:`PatchDrawingDataset`: load, transform and patch sampling all run in the workers.

    Each subject carries ``num_samples`` (its patches per pass, see ``rank_share``).
    """
    return tio.Queue(
        PatchDrawingDataset(subjects, transform, sampler),
        max_length=queue_length,
        samples_per_volume=samples_per_volume,
        sampler=hand_out,
        num_workers=num_workers,
        start_background=False,
    )


def rank_share(items: list[T], samples_per_volume: int, rank: int, world_size: int) -> list[tuple[T, int]]:
    """This rank's disjoint share of items (round robin), each with its number of patches per epoch.

    Ranks holding one item fewer draw proportionally more patches per item,
    so every rank has ceil(n / world_size) * samples_per_volume patches per epoch:
    unequal epoch lengths would leave a DDP rank waiting in an all-reduce forever.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, {world_size})")
    if len(items) < world_size:
        raise ValueError(f"{len(items)} subjects cannot be shared by {world_size} ranks")
    shard = items[rank::world_size]
    patches_per_rank = math.ceil(len(items) / world_size) * samples_per_volume
    base, extra = divmod(patches_per_rank, len(shard))
    return [(item, base + int(index < extra)) for index, item in enumerate(shard)]


def _rank_subjects(
    pairs: list[tuple[Path, Path]], samples_per_volume: int, rank: int, world_size: int
) -> list[tio.Subject]:
    """This rank's subjects (see ``rank_share``), with per-subject patch counts."""
    return [
        tio.Subject(
            image=tio.ScalarImage(image),
            label=tio.LabelMap(label),
            case_id=_case_id(Path(image)),
            num_samples=num_samples,
        )
        for (image, label), num_samples in rank_share(pairs, samples_per_volume, rank, world_size)
    ]


def _case_id(path: Path) -> str:
    """``BraTS-GLI-00000-000.nii.gz`` -> ``BraTS-GLI-00000-000`` (also .nrrd, .mha, ...)."""
    return Path(path.name.removesuffix(".gz")).stem


def collate_patches(patches: list[tio.Subject]) -> dict[str, Any]:
    """Plain tensors instead of torchio's nested per-image dicts."""
    return {
        "image": torch.stack([patch["image"].data for patch in patches]).to(torch.float32),
        "label": torch.stack([patch["label"].data for patch in patches]).to(torch.int64),
        "location": torch.stack([torch.as_tensor(patch[tio.LOCATION]) for patch in patches]).to(torch.int64),
        "case_id": [patch["case_id"] for patch in patches],
    }


class PrivateRngLoader(DataLoader):
    """DataLoader whose randomness comes from its own seeded stream, not the caller's.

    torchio (patch centres, augmentation, subject and patch shuffling) and the
    queue's worker seeds all draw from the global torch RNG. Swapping in a
    private RNG state around every fetch makes the batch sequence depend only on
    the seed, not on what the model (initialisation, dropout) draws in between:
    two runs, or two ablation variants with the same seed, see the same patches.
    """

    def __init__(self, dataset: tio.Queue, seed: int, rank: int = 0, **kwargs: Any):
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
