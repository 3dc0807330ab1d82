"""Seeded patient-/subject-level train/val/test splits of a prepared dataset index.

``method="random"``: all cases of one patient land in the same split, so no patient leaks from
training into testing. Sizes are case counts (int) or fractions (< 1) of the labelled cases;
train gets the rest. ``method="folders"``: the split the dataset ships (AMOS imagesTr -> train,
imagesVa -> val, imagesTs -> test); where it ships no validation folder, ``val`` cases are drawn
(seeded) from its training folder. Classification splits are also stratified by class, so every
split has the dataset's class balance (and AUC is defined on val and test). ``val=0`` means no
validation split. ``method="kfold"``: the test cases are held out as for ``random``, and the
rest is dealt into ``folds`` folds of whole patients (stratified by class for classification);
fold k validates the model trained on the other folds, nnU-Net's cross-validation.
"""

from __future__ import annotations

import math
import random
from collections import Counter, defaultdict
from collections.abc import Callable

from sklearn.model_selection import GroupKFold, StratifiedGroupKFold

from nnmamba.data.errors import DataError


def split_sizes(n_cases: int, val: float, test: float) -> tuple[int, int]:
    """Case counts for (val, test): ints are taken as counts, values below 1 as fractions."""
    sizes = tuple(round(n_cases * s) if 0 < s < 1 else int(s) for s in (val, test))
    if sum(sizes) >= n_cases:
        raise ValueError(f"split asks for {sizes[0]} val + {sizes[1]} test cases but the dataset has only {n_cases}")
    return sizes


def patient_split(case_ids: list[str], patient_of: Callable[[str], str], val: float, test: float,
                  seed: int) -> dict[str, list[str]]:
    """Shuffle patients (seeded) and fill test, then val, to their case counts; train takes the rest.

    Hand-written because scikit-learn's group splitters take group counts or fractions, not the
    exact case counts the paper's splits are given in (875/125/251).
    """
    by_patient: dict[str, list[str]] = defaultdict(list)
    for case_id in sorted(case_ids):
        by_patient[patient_of(case_id)].append(case_id)
    patients = sorted(by_patient)
    random.Random(seed).shuffle(patients)
    n_val, n_test = split_sizes(len(case_ids), val, test)
    split: dict[str, list[str]] = {"test": [], "val": [], "train": []}
    for patient in patients:
        if len(split["test"]) < n_test:
            split["test"] += by_patient[patient]
        elif len(split["val"]) < n_val:
            split["val"] += by_patient[patient]
        else:
            split["train"] += by_patient[patient]
    return {name: sorted(ids) for name, ids in split.items()}


def folder_split(subsets: dict[str, str | None], patient_of: Callable[[str], str], val: float,
                 seed: int) -> dict[str, list[str]]:
    """The dataset's own train/val/test folders; val drawn from train when the dataset has none."""
    missing = sorted(case_id for case_id, subset in subsets.items() if subset is None)
    if missing:
        raise DataError(f"split.method 'folders' needs a dataset that assigns splits (AMOS, nnU-Net folders); "
                        f"case {missing[0]} has none")
    split = {name: sorted(c for c, s in subsets.items() if s == name) for name in ("test", "val", "train")}
    if not split["val"]:
        drawn = patient_split(split["train"], patient_of, val, 0, seed)
        split["train"], split["val"] = drawn["train"], drawn["val"]
    return split


def split_cases(index: dict, patient_of: Callable[[str], str], method: str, val: float, test: float, seed: int,
                require_labels: bool = True) -> dict[str, list[str]]:
    """train/val/test case ids of a prepared dataset index; ``test`` is unused by ``method="folders"``.

    ``require_labels``: a random split of a segmentation dataset must not hand an unlabelled case to
    training or testing (landmark cases carry points instead of label maps).
    """
    if method == "folders":
        subsets = {case_id: entry.get("subset") for case_id, entry in index["cases"].items()}
        return folder_split(subsets, patient_of, val, seed)
    if method != "random":
        raise ValueError(f"unknown split.method {method!r} here; known: ['folders', 'random'] (k-fold: `with_folds`)")
    unlabelled = sorted(c for c, entry in index["cases"].items() if require_labels and entry["label"] is None)
    if unlabelled:
        raise DataError(f"split.method 'random' splits labelled cases, but case {unlabelled[0]} has no label: "
                        "leave unlabelled folders out of dataset.reader.subsets or use split.method 'folders'")
    return patient_split(list(index["cases"]), patient_of, val, test, seed)


def stratified_subject_split(subject_of: dict[str, str], class_of: dict[str, str], val: float, test: float,
                             seed: int) -> dict[str, list[str]]:
    """A subject-level split with each class's share of test and val cases equal to its share of the data.

    Subjects are grouped into strata by their set of classes (a subject whose visits carry two
    diagnoses is its own stratum); each stratum fills its quota of test, then val cases from
    its seeded-shuffled subjects, and train takes the rest. Quotas are proportional to the
    stratum's case count, rounded by largest remainder so they add up to the requested sizes.
    A subject's visits stay together, so a quota may be exceeded by one subject's extra visits.
    Hand-written for the same reason as `patient_split`: scikit-learn's StratifiedGroupKFold
    gives folds, not exact case counts such as the paper's 351/296 (Table 6).
    """
    by_subject: dict[str, list[str]] = defaultdict(list)
    for case_id in sorted(subject_of):
        by_subject[subject_of[case_id]].append(case_id)
    stratum_of = {s: "+".join(sorted({class_of[c] for c in cases})) for s, cases in by_subject.items()}
    stratum_sizes = Counter({k: 0 for k in stratum_of.values()})
    for subject, cases in by_subject.items():
        stratum_sizes[stratum_of[subject]] += len(cases)
    n_val, n_test = split_sizes(len(subject_of), val, test)
    quotas = {"test": apportion(n_test, stratum_sizes), "val": apportion(n_val, stratum_sizes)}
    rng = random.Random(seed)
    split: dict[str, list[str]] = {"test": [], "val": [], "train": []}
    for stratum in sorted(stratum_sizes):
        subjects = sorted(s for s in by_subject if stratum_of[s] == stratum)
        rng.shuffle(subjects)
        filled: Counter[str] = Counter()
        for subject in subjects:
            part = next((p for p in ("test", "val") if filled[p] < quotas[p][stratum]), "train")
            split[part] += by_subject[subject]
            filled[part] += len(by_subject[subject])
    return {name: sorted(ids) for name, ids in split.items()}


def apportion(total: int, sizes: Counter[str]) -> dict[str, int]:
    """Split `total` over the keys proportionally to `sizes`, in integers that add up (largest remainder)."""
    grand = sum(sizes.values())
    exact = {key: total * size / grand for key, size in sizes.items()}
    quotas = {key: math.floor(value) for key, value in exact.items()}
    by_remainder = sorted(exact, key=lambda key: (quotas[key] - exact[key], key))
    for key in by_remainder[: total - sum(quotas.values())]:
        quotas[key] += 1
    return quotas


def classification_split(index: dict, val: float, test: float, seed: int) -> dict[str, list[str]]:
    """Stratified subject-level split of a prepared classification dataset; every class in val and test."""
    cases = index["cases"]
    split = stratified_subject_split({c: e["subject"] for c, e in cases.items()},
                                     {c: e["class_name"] for c, e in cases.items()}, val, test, seed)
    for name in ("val", "test"):
        missing = sorted(set(index["labels"].values()) - {cases[c]["class_name"] for c in split[name]})
        if split[name] and missing:
            raise ValueError(f"the {name} split ({len(split[name])} cases) holds no case of class(es) {missing}; "
                             f"AUC needs every class: raise split.{name}")
    return split


def kfold(case_ids: list[str], group_of: Callable[[str], str], folds: int, seed: int,
          class_of: dict[str, str] | None = None) -> list[list[str]]:
    """`case_ids` dealt into `folds` folds, each patient (group) in one fold; with `class_of`, each fold
    also keeps the classes' shares as far as whole groups allow (scikit-learn's seeded GroupKFold /
    StratifiedGroupKFold)."""
    cases = sorted(case_ids)
    groups = [group_of(c) for c in cases]
    if len(set(groups)) < folds:
        raise ValueError(f"split.folds {folds} needs at least {folds} patients outside the test split; "
                         f"there are {len(set(groups))}: lower split.folds or split.test")
    if class_of is None:
        splitter = GroupKFold(n_splits=folds, shuffle=True, random_state=seed)
        parts = splitter.split(cases, groups=groups)
    else:
        splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
        parts = splitter.split(cases, [class_of[c] for c in cases], groups=groups)
    dealt = [sorted(cases[i] for i in held_out) for _, held_out in parts]
    if class_of is not None:
        for number, fold in enumerate(dealt):
            missing = sorted(set(class_of.values()) - {class_of[c] for c in fold})
            if missing:
                raise ValueError(f"fold {number} ({len(fold)} cases) holds no case of class(es) {missing}; "
                                 f"AUC needs every class: lower split.folds")
    return dealt


def with_folds(split: dict[str, list[str]], group_of: Callable[[str], str], folds: int, seed: int,
               class_of: dict[str, str] | None = None) -> dict:
    """A train/test split (no val) with its training cases dealt into `folds` (see `kfold`)."""
    if split["val"]:
        raise ValueError("k-fold splits take their validation cases from the folds: the split must have no val")
    return {**split, "folds": kfold(split["train"], group_of, folds, seed, class_of)}
