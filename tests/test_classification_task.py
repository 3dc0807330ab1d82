"""Classification training: whole-volume loader, validation and summary, stratified subject-level split."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pytest
import torch

from nnmamba.data.loading.augmentation import Augmentation
from nnmamba.data.loading.volume_batches import make_volume_loader
from nnmamba.data.readers.adni import find_adni_cases
from nnmamba.data.synthetic.adni import write_synthetic_adni
from nnmamba.data.preprocessing.whole_volume import prepare_classification_dataset
from nnmamba.data.splits import apportion, classification_split, stratified_subject_split
from nnmamba.models import build_model
from pipelines.params import load_params
from pipelines.tasks import get_task

FLIPS = Augmentation(flip_axes=(0,), flip_p=0.5)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("adni")
    write_synthetic_adni(root / "raw", {"NC": 3, "AD": 3}, second_visit_fraction=0.5, shape=(32, 32, 24),
                         spacing=(1.5, 1.5, 2.0))
    prepare_classification_dataset(find_adni_cases(root / "raw"), root / "prepared", ["NC", "AD"], (3.0,) * 3,
                                   (16, 16, 16), progress=False)
    return root / "prepared"


def index_of(prepared: Path) -> dict:
    return json.loads((prepared / "dataset.json").read_text())


def volume_loader(prepared: Path, index: dict, case_ids: list[str], seed: int, rank: int = 0,
                  world_size: int = 1) -> Iterable[dict]:
    """Batches of 2 flipped-or-not volumes of ``case_ids``, as the classification task's loader makes them."""
    return make_volume_loader([prepared / index["cases"][c]["image"] for c in case_ids],
                              [index["cases"][c]["class_index"] for c in case_ids], case_ids, batch_size=2,
                              augmentation=FLIPS, num_workers=0, seed=seed, rank=rank, world_size=world_size)


def test_loader_batches_whole_volumes_with_their_class_and_shards_ranks(prepared):
    index = index_of(prepared)
    case_ids = sorted(index["cases"])[:7]  # shares of 4 and 3 cases: the second rank tops up its last batch
    seen, lengths = [], []
    for rank in range(2):
        batches = list(volume_loader(prepared, index, case_ids, seed=3, rank=rank, world_size=2))
        for batch in batches:
            assert batch["image"].shape == (2, 1, 16, 16, 16) and batch["image"].dtype == torch.float32
            assert batch["label"].tolist() == [index["cases"][c]["class_index"] for c in batch["case_id"]]
        seen.append({c for batch in batches for c in batch["case_id"]})
        lengths.append(len(batches))
    assert sorted(seen[0] | seen[1]) == case_ids and not seen[0] & seen[1]
    assert lengths == [2, 2]  # ceil(ceil(7 / 2 ranks) / batch 2) on both ranks
    with pytest.raises(ValueError, match="2 subjects cannot be shared by 3 ranks"):
        volume_loader(prepared, index, case_ids[:2], seed=3, rank=2, world_size=3)


def test_loader_order_and_augmentation_depend_only_on_the_seed(prepared):
    index = index_of(prepared)
    case_ids = sorted(index["cases"])

    def epoch(seed: int, caller_seed: int) -> list[tuple[list[str], torch.Tensor]]:
        torch.manual_seed(caller_seed)  # whatever the caller's RNG holds
        return [(b["case_id"], b["image"]) for b in volume_loader(prepared, index, case_ids, seed)]

    first, again, other = epoch(5, caller_seed=1), epoch(5, caller_seed=2), epoch(6, caller_seed=1)
    assert [ids for ids, _ in first] == [ids for ids, _ in again]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(first, again))
    assert [ids for ids, _ in first] != [ids for ids, _ in other]
    # The flips follow the seed too: some case is flipped under one seed and not the other.
    seen_with_5 = {case: image for ids, batch in first for case, image in zip(ids, batch)}
    assert any(not torch.equal(seen_with_5[case], image) for ids, batch in other for case, image in zip(ids, batch))


def test_validation_records_probabilities_and_summary_scores_them(prepared):
    index = index_of(prepared)
    task = get_task("classification")
    torch.manual_seed(0)
    model = build_model("classification", "sequence", 1, 2, base_channels=4, blocks_per_stage=1)
    case_ids = sorted(index["cases"])
    records = task.validate(model, prepared, case_ids, load_params().study("adni_ad"), torch.device("cpu"), None)
    assert [r["case_id"] for r in records] == case_ids
    assert [r["target"] for r in records] == [index["cases"][c]["class_index"] for c in case_ids]
    assert all(sum(r["probabilities"]) == pytest.approx(1) for r in records)
    summary = task.summarise(records)
    targets = np.array([r["target"] for r in records])
    p_ad = np.array([r["probabilities"][1] for r in records])
    # AUC = fraction of (AD, NC) pairs ranked right (ties half), computed here pair by pair.
    pairs = [(a > n) + 0.5 * (a == n) for a in p_ad[targets == 1] for n in p_ad[targets == 0]]
    assert summary["val_auc"] == pytest.approx(np.mean(pairs))
    assert summary["val_acc"] == pytest.approx(np.mean((p_ad > 0.5) == targets))


def cohort(n_nc: int, n_ad: int, two_visits_every: int) -> tuple[dict[str, str], dict[str, str]]:
    subject_of, class_of = {}, {}
    for diagnosis, count in (("NC", n_nc), ("AD", n_ad)):
        for i in range(count):
            subject = f"{diagnosis}{i:02d}"
            for visit in ("bl", "m12")[: 1 + (i % two_visits_every == 0)]:
                subject_of[f"{subject}_{visit}"] = subject
                class_of[f"{subject}_{visit}"] = diagnosis
    return subject_of, class_of


def test_stratified_split_keeps_subjects_whole_and_classes_balanced():
    subject_of, class_of = cohort(n_nc=40, n_ad=20, two_visits_every=4)  # 75 cases: 50 NC, 25 AD
    split = stratified_subject_split(subject_of, class_of, val=6, test=15, seed=0)
    subjects = {name: {subject_of[c] for c in ids} for name, ids in split.items()}
    assert not (subjects["train"] & subjects["val"] or subjects["train"] & subjects["test"]
                or subjects["val"] & subjects["test"])
    assert sorted(sum(split.values(), [])) == sorted(subject_of)
    # Quotas 10 NC + 5 AD for test, 4 + 2 for val; a two-visit subject may overshoot by one case.
    test, val = Counter(class_of[c] for c in split["test"]), Counter(class_of[c] for c in split["val"])
    assert 10 <= test["NC"] <= 11 and 5 <= test["AD"] <= 6
    assert 4 <= val["NC"] <= 5 and 2 <= val["AD"] <= 3
    assert split == stratified_subject_split(subject_of, class_of, val=6, test=15, seed=0)
    assert split != stratified_subject_split(subject_of, class_of, val=6, test=15, seed=1)


def test_single_visit_cohort_gets_exact_sizes_and_no_validation_when_asked():
    subject_of, class_of = cohort(n_nc=351, n_ad=296, two_visits_every=10**6)  # index 0 only has two visits
    split = stratified_subject_split(subject_of, class_of, val=0, test=296, seed=0)
    assert split["val"] == [] and len(split["test"]) in (296, 297)
    assert len(split["train"]) == len(subject_of) - len(split["test"])


def test_apportion_by_largest_remainder():
    assert apportion(5, Counter(a=3, b=1, c=1)) == {"a": 3, "b": 1, "c": 1}
    assert apportion(3, Counter(a=5, b=5)) == {"a": 2, "b": 1}  # tie: the first key wins
    assert apportion(4, Counter(a=10, b=1)) == {"a": 4, "b": 0}


def test_classification_split_needs_every_class_in_val_and_test():
    subject_of, class_of = cohort(n_nc=8, n_ad=2, two_visits_every=10**6)
    index = {"labels": {"0": "NC", "1": "AD"},
             "cases": {c: {"subject": subject_of[c], "class_name": class_of[c]} for c in subject_of}}
    with pytest.raises(ValueError, match=r"the val split \(1 cases\) holds no case of class\(es\) \['AD'\]"):
        classification_split(index, val=1, test=4, seed=0)
    split = classification_split(index, val=0, test=4, seed=0)
    assert split["val"] == [] and {class_of[c] for c in split["test"]} == {"NC", "AD"}
