"""Patient-level splits: exact case counts, no patient in two splits, deterministic per seed."""

import pytest

from nnmamba.data.splits import patient_split, split_sizes


def brats_patient(case_id: str) -> str:
    return case_id.rsplit("-", 1)[0]


CASES = [f"BraTS-GLI-{p:05d}-{t:03d}" for p in range(20) for t in range(1 + p % 3)]


def test_counts_and_no_patient_leaks_between_splits():
    split = patient_split(CASES, brats_patient, val=5, test=8, seed=0)
    assert sorted(split["train"] + split["val"] + split["test"]) == sorted(CASES)
    patients = {name: {brats_patient(c) for c in ids} for name, ids in split.items()}
    assert not patients["train"] & patients["val"]
    assert not patients["train"] & patients["test"]
    assert not patients["val"] & patients["test"]
    # Whole patients are moved, so a split may overshoot its count by less than one patient's cases (max 3 here).
    assert 8 <= len(split["test"]) < 8 + 3 and 5 <= len(split["val"]) < 5 + 3


def test_same_seed_same_split_other_seed_other_split():
    assert patient_split(CASES, brats_patient, 5, 8, seed=1) == patient_split(CASES, brats_patient, 5, 8, seed=1)
    assert patient_split(CASES, brats_patient, 5, 8, seed=1) != patient_split(CASES, brats_patient, 5, 8, seed=2)


def test_sizes_accept_counts_and_fractions_and_refuse_too_many():
    assert split_sizes(1251, 125, 251) == (125, 251)
    assert split_sizes(100, 0.1, 0.2) == (10, 20)
    with pytest.raises(ValueError, match="only 10"):
        split_sizes(10, 5, 5)
