"""DVC stage `split@<study>`: a seeded, patient-level train/val/test split saved as JSON.

`split.method: random` (default): all cases of one patient land in the same split, so no patient
leaks from training into testing. Sizes are case counts (int) or fractions (< 1) of the labelled
cases; train gets the rest. `split.method: folders`: the split the dataset ships (AMOS imagesTr ->
train, imagesVa -> val, imagesTs -> test); where it ships no validation folder, `split.val` cases
are drawn (seeded) from its training folder.

    python -m pipelines.split brats2023
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections import defaultdict

from nnmamba.data.errors import DataError
from nnmamba.data.layouts import get_layout
from pipelines.config import resolve_path, study_config, write_json
from pipelines.prepare import PREPROCESSED_ROOT

SPLITS_ROOT = "data/splits"


def split_sizes(n_cases: int, val: float, test: float) -> tuple[int, int]:
    """Case counts for (val, test): ints are taken as counts, values below 1 as fractions."""
    sizes = tuple(round(n_cases * s) if 0 < s < 1 else int(s) for s in (val, test))
    if sum(sizes) >= n_cases:
        raise ValueError(f"split asks for {sizes[0]} val + {sizes[1]} test cases but the dataset has only {n_cases}")
    return sizes


def patient_split(case_ids: list[str], patient_of, val: float, test: float, seed: int) -> dict[str, list[str]]:
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


def folder_split(subsets: dict[str, str | None], patient_of, val: float, seed: int) -> dict[str, list[str]]:
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


def split_cases(index: dict, patient_of, spec: dict, require_labels: bool = True) -> dict[str, list[str]]:
    """train/val/test case ids of a prepared dataset index by `spec` (the study's `split` section).

    `require_labels`: a random split of a segmentation dataset must not hand an unlabelled case to
    training or testing (landmark cases carry points instead of label maps).
    """
    method = spec.get("method", "random")
    if method == "folders":
        subsets = {case_id: entry.get("subset") for case_id, entry in index["cases"].items()}
        return folder_split(subsets, patient_of, spec["val"], spec["seed"])
    if method != "random":
        raise ValueError(f"unknown split.method {method!r}; known: ['folders', 'random']")
    unlabelled = sorted(c for c, entry in index["cases"].items() if require_labels and entry["label"] is None)
    if unlabelled:
        raise DataError(f"split.method 'random' splits labelled cases, but case {unlabelled[0]} has no label: "
                        "leave unlabelled folders out of dataset.reader.subsets or use split.method 'folders'")
    return patient_split(list(index["cases"]), patient_of, spec["val"], spec["test"], spec["seed"])


def make_split(study: str) -> dict:
    """Split the prepared cases of one study and write `data/splits/<study>.json`."""
    config = study_config(study)
    index = json.loads((resolve_path(PREPROCESSED_ROOT) / study / "dataset.json").read_text())
    spec = config["split"]
    split = split_cases(index, get_layout(config["dataset"]["layout"]).patient_of, spec,
                        require_labels=config["task"] == "segmentation")
    write_json(resolve_path(SPLITS_ROOT) / f"{study}.json", {"seed": spec["seed"], **split})
    print("split: " + ", ".join(f"{name} {len(ids)}" for name, ids in split.items()))
    return split


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("study", help="key under `studies` in params.yaml")
    try:
        make_split(parser.parse_args().study)
    except DataError as error:
        sys.exit(f"split: {error}")


if __name__ == "__main__":
    main()
