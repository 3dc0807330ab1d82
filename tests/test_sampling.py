"""Patch loader on a prepared synthetic dataset: shapes, content, oversampling, sharding, seeding."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import torchio as tio

from nnmamba.data.readers.brats import BRATS_LABELS, find_brats_cases
from nnmamba.data.preprocessing.preprocess import load_preprocessed, prepare_dataset
from nnmamba.data.loading.augmentation import Augmentation, augmentation_transform
from nnmamba.data.loading.sampling import SubjectGroups, make_patch_loader, voxel_probabilities
from nnmamba.data.synthetic.brats import write_synthetic_brats
from nnmamba.data.loading.worker_buffers import TURNS

SHAPE = (32, 32, 24)
N_CASES = 4
FOREGROUND_ONLY = {0: 0.0, 1: 1.0, 2: 1.0, 3: 1.0}
AUGMENTATION = Augmentation(flip_axes=(0, 1, 2), flip_p=0.5, affine_p=0.5, scales=0.1, degrees=10, gamma_p=0.5,
                            noise_p=0.5)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> dict:
    raw = tmp_path_factory.mktemp("raw")
    write_synthetic_brats(raw, n_cases=N_CASES, shape=SHAPE, seed=2)
    out_dir = tmp_path_factory.mktemp("prepared") / "brats"
    prepare_dataset(find_brats_cases(raw), out_dir, BRATS_LABELS, crop_margin=1, progress=False)
    cases = json.loads((out_dir / "dataset.json").read_text())["cases"]
    return {
        "dir": out_dir,
        "images": [out_dir / c["image"] for c in cases.values()],
        "labels": [out_dir / c["label"] for c in cases.values()],
        "shapes": {case_id: c["properties"]["preprocessed_shape"] for case_id, c in cases.items()},
    }


def _loader(dataset: dict, **overrides):
    arguments = dict(
        image_paths=dataset["images"], label_paths=dataset["labels"], patch_size=(16, 16, 16), batch_size=2,
        samples_per_volume=3, queue_length=6, label_probabilities=None, augmentation=Augmentation(), num_workers=0,
        seed=0,
    )
    arguments.update(overrides)
    return make_patch_loader(**arguments)


def _epoch(loader) -> list[dict]:
    return list(loader)


def test_batches_are_plain_tensors_and_crops_of_the_volume(dataset: dict) -> None:
    batches = _epoch(_loader(dataset, label_probabilities={0: 1.0, 1: 1.0, 2: 1.0, 3: 1.0}))
    assert Counter(c for b in batches for c in b["case_id"]) == {case_id: 3 for case_id in dataset["shapes"]}
    assert all(len(set(b["case_id"])) == len(b["case_id"]) for b in batches)  # a batch's patches: different cases
    volumes = {case_id: load_preprocessed(dataset["dir"], case_id) for case_id in dataset["shapes"]}
    for batch in batches:
        assert batch["image"].dtype == torch.float32 and batch["image"].shape[1:] == (4, 16, 16, 16)
        assert batch["label"].dtype == torch.uint8 and batch["label"].shape[1:] == (1, 16, 16, 16)
        for image, label, location, case_id in zip(batch["image"], batch["label"], batch["location"], batch["case_id"]):
            i0, j0, k0, i1, j1, k1 = location.tolist()
            volume = volumes[case_id]
            torch.testing.assert_close(image, volume["image"].data[:, i0:i1, j0:j1, k0:k1], rtol=0, atol=0)
            assert torch.equal(label.long(), volume["label"].data[:, i0:i1, j0:j1, k0:k1].long())


def test_volumes_smaller_than_the_patch_are_padded(dataset: dict) -> None:
    largest = max(max(shape) for shape in dataset["shapes"].values())
    patch = (largest + 4, 8, largest + 2)
    batch = next(iter(_loader(dataset, patch_size=patch, augmentation=AUGMENTATION)))
    assert batch["image"].shape[2:] == patch and batch["label"].shape[2:] == patch


def _foreground_fraction(batches: list[dict]) -> float:
    contains = torch.cat([(b["label"].flatten(1) > 0).any(dim=1) for b in batches])
    return contains.float().mean().item()


def test_foreground_oversampling_puts_foreground_in_every_patch(dataset: dict) -> None:
    small = (8, 8, 8)
    oversampled = _epoch(_loader(dataset, patch_size=small, label_probabilities=FOREGROUND_ONLY))
    background = _epoch(_loader(dataset, patch_size=small, label_probabilities={0: 1.0}))
    assert _foreground_fraction(oversampled) == 1.0
    assert _foreground_fraction(background) < 0.8


def test_foreground_only_at_the_border_is_still_sampled(tmp_path: Path) -> None:
    """torchio's plain LabelSampler cannot centre a patch on a corner voxel."""
    affine = np.eye(4)
    image, label = tmp_path / "corner.nii.gz", tmp_path / "corner-label.nii.gz"
    data = np.random.default_rng(0).standard_normal((2, 20, 18, 16)).astype(np.float32)
    tio.ScalarImage(tensor=torch.from_numpy(data), affine=affine).save(image)
    labels = torch.zeros(1, 20, 18, 16, dtype=torch.uint8)
    labels[0, 19, 0, 15] = 2
    tio.LabelMap(tensor=labels, affine=affine).save(label)
    loader = make_patch_loader([image], [label], (8, 8, 8), 2, 4, 4, FOREGROUND_ONLY, Augmentation(), 0, seed=0)
    for batch in _epoch(loader):
        assert (batch["label"] == 2).flatten(1).any(dim=1).all()
        assert (batch["location"][:, :3] == torch.tensor([12, 0, 8])).all()


def test_ddp_shards_are_disjoint_covering_and_equally_long(dataset: dict) -> None:
    world_size = 3
    seen, lengths, patches = [], [], []
    for rank in range(world_size):
        loader = _loader(dataset, rank=rank, world_size=world_size)
        batches = _epoch(loader)
        seen.append({case_id for b in batches for case_id in b["case_id"]})
        lengths.append(len(loader))
        patches.append(sum(len(b["case_id"]) for b in batches))
    assert set().union(*seen) == set(dataset["shapes"])
    assert sum(len(s) for s in seen) == N_CASES
    assert len(set(lengths)) == 1 and len(set(patches)) == 1 and lengths[0] == len(batches)


def test_same_seed_same_batches_whatever_else_draws_random_numbers(dataset: dict) -> None:
    def two_epochs(seed: int, disturb: bool) -> list[dict]:
        torch.manual_seed(1000 + disturb)
        loader = _loader(dataset, augmentation=AUGMENTATION, num_workers=1, seed=seed,
                         label_probabilities={0: 1.0, 1: 1.0})
        batches = []
        for _ in range(2):
            for batch in loader:
                batches.append(batch)
                if disturb:  # a model drawing dropout masks between steps
                    torch.rand(100)
        return batches

    first, again, other = two_epochs(7, False), two_epochs(7, True), two_epochs(8, False)
    assert len(first) == len(again) > 0
    for a, b in zip(first, again):
        assert a["case_id"] == b["case_id"]
        assert torch.equal(a["location"], b["location"])
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])
    assert any(not torch.equal(a["image"], c["image"]) for a, c in zip(first, other))


def test_augmentation_maps_onto_torchio(dataset: dict) -> None:
    subject = load_preprocessed(dataset["dir"], next(iter(dataset["shapes"])))
    original = subject["image"].data.clone()
    assert torch.equal(augmentation_transform(Augmentation())(subject)["image"].data, original)
    flipped = augmentation_transform(Augmentation(flip_axes=(1,), flip_p=1.0))(subject)
    assert torch.equal(flipped["image"].data, torch.flip(original, dims=[2]))
    transform = augmentation_transform(AUGMENTATION)
    assert [type(t) for t in transform.transforms] == [tio.RandomFlip, tio.RandomAffine, tio.RandomGamma,
                                                        tio.RandomNoise]


def test_bad_arguments(dataset: dict) -> None:
    with pytest.raises(ValueError, match="4 images but 3 labels"):
        _loader(dataset, label_paths=dataset["labels"][:3])
    with pytest.raises(ValueError, match="4 subjects cannot be shared by 5 ranks"):
        _loader(dataset, rank=0, world_size=5)
    with pytest.raises(ValueError, match="rank 2 is not in"):
        _loader(dataset, rank=2, world_size=2)



def test_every_batch_is_full_and_mixes_cases_when_cases_do_not_divide_into_batches(dataset: dict) -> None:
    loader = _loader(dataset, batch_size=3, samples_per_volume=2)
    batches = _epoch(loader)
    assert len(batches) == len(loader) == 2 * 2  # ceil(4 cases / 3) groups, 2 patches per case
    assert all(len(b["case_id"]) == 3 and b["image"].shape[0] == 3 for b in batches)
    assert set().union(*(b["case_id"] for b in batches)) == set(dataset["shapes"])


def test_each_pass_deals_every_case_once_into_groups_topped_up_at_random() -> None:
    torch.manual_seed(0)
    for _ in range(5):
        groups = list(SubjectGroups(subjects=5, size=2, groups=3))
        assert len(groups) == 3 and all(len(g) == 2 for g in groups)
        flat = [i for g in groups for i in g]
        assert sorted(flat[:5]) == [0, 1, 2, 3, 4] and 0 <= flat[5] < 5
    with pytest.raises(ValueError, match="cannot hold"):
        SubjectGroups(subjects=5, size=2, groups=2)


def test_voxel_probabilities_match_torchios_label_sampler() -> None:
    """Against torchio's own rule: labels absent from the volume (5) and labels not listed (3) drop out."""
    labels = torch.from_numpy(np.random.default_rng(0).integers(0, 4, (1, 9, 8, 7))).to(torch.uint8)
    weights = {0: 0.5, 1: 2.0, 2: 0.0, 5: 1.0}
    ours = voxel_probabilities(labels, weights).double()
    theirs = tio.LabelSampler.get_probabilities_from_label_map(labels.float(), weights, np.ones(3, dtype=int)).double()
    torch.testing.assert_close(ours / ours.sum(), theirs / theirs.sum())
    with pytest.raises(ValueError, match="one-channel"):
        voxel_probabilities(torch.zeros(2, 3, 3, 3, dtype=torch.uint8), weights)


@pytest.mark.parametrize("pin_memory", [False, pytest.param(True, marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="pinning needs CUDA"))])
def test_batches_from_workers_survive_the_workers_reusing_their_buffers(dataset: dict, pin_memory: bool) -> None:
    """Workers rewrite their shared buffers every TURNS groups; batches kept for long enough that each
    worker rewrote every set twice must still hold the crops their locations name (copied out by the
    pin thread, or cloned without pinning)."""
    workers, samples_per_volume = 2, 2
    loader = _loader(dataset, num_workers=workers, samples_per_volume=samples_per_volume,
                     label_probabilities={0: 1.0, 1: 1.0}, pin_memory=pin_memory)
    groups_per_worker = len(loader) // samples_per_volume // workers  # per epoch
    epochs = math.ceil((2 * TURNS + 1) / groups_per_worker)
    kept = [batch for _ in range(epochs) for batch in loader]
    assert len(kept) == epochs * len(loader)
    volumes = {case_id: load_preprocessed(dataset["dir"], case_id)["image"].data for case_id in dataset["shapes"]}
    for batch in kept:
        for image, location, case_id in zip(batch["image"], batch["location"], batch["case_id"]):
            i0, j0, k0, i1, j1, k1 = location.tolist()
            assert torch.equal(image, volumes[case_id][:, i0:i1, j0:j1, k0:k1])


@pytest.mark.parametrize("workers", [0, 2])
def test_an_endless_loader_deals_every_case_in_each_pass_from_one_iteration(dataset: dict, workers: int) -> None:
    finite = _loader(dataset, num_workers=workers)
    per_pass = len(finite)
    endless = _loader(dataset, num_workers=workers, passes=None)
    with pytest.raises(TypeError):
        len(endless)
    batches = iter(endless)
    passes = [[next(batches) for _ in range(per_pass)] for _ in range(3)]
    for drawn in passes:
        counts = Counter(c for b in drawn for c in b["case_id"])
        assert set(counts) == set(dataset["shapes"])   # the last group's top-up may repeat cases
        assert sum(counts.values()) == sum(len(b["case_id"]) for b in _epoch(finite))
    assert not torch.equal(passes[0][0]["image"], passes[1][0]["image"])  # each pass is drawn afresh
