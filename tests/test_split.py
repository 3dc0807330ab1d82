"""Patient-level splits: exact case counts, no patient in two splits, deterministic per seed."""

import pytest

from nnmamba.data.splits import kfold, patient_split, split_sizes, with_folds


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


def test_kfold_deals_whole_patients_into_disjoint_folds_the_seed_decides():
    cases = [f"p{p}-t{t}" for p in range(10) for t in range(1 + p % 3)]   # 1-3 timepoints per patient
    patient = lambda case: case.split("-")[0]  # noqa: E731
    folds = kfold(cases, patient, 5, seed=3)
    assert sorted(c for fold in folds for c in fold) == sorted(cases) and len(folds) == 5
    assert all({patient(c) for c in a}.isdisjoint({patient(c) for c in b}) for a in folds for b in folds if a is not b)
    assert folds == kfold(list(reversed(cases)), patient, 5, seed=3) and folds != kfold(cases, patient, 5, seed=4)
    with pytest.raises(ValueError, match="split.folds 11 needs at least 11 patients outside the test split"):
        kfold(cases, patient, 11, seed=0)


def test_stratified_kfold_keeps_every_class_in_every_fold():
    class_of = {f"s{i}": "AD" if i % 3 == 0 else "NC" for i in range(18)}
    folds = kfold(list(class_of), lambda c: c, 3, seed=0, class_of=class_of)
    assert [sorted(class_of[c] for c in fold).count("AD") for fold in folds] == [2, 2, 2]
    rare = {**class_of, "s0": "pMCI"}
    with pytest.raises(ValueError, match=r"holds no case of class\(es\) \['pMCI'\]"):
        kfold(list(rare), lambda c: c, 3, seed=0, class_of=rare)


def test_with_folds_takes_validation_from_the_folds_only():
    split = {"train": ["a", "b", "c", "d"], "val": [], "test": ["e"]}
    assert with_folds(split, lambda c: c, 2, seed=0)["test"] == ["e"]
    with pytest.raises(ValueError, match="must have no val"):
        with_folds({**split, "val": ["d"]}, lambda c: c, 2, seed=0)
