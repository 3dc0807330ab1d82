"""DVC stage `split@<study>`: a seeded, patient-level train/val/test split saved as JSON.

All cases of one patient land in the same split, so no patient leaks from training into testing.
Sizes are case counts (int) or fractions (< 1) of the dataset; train gets the rest.

    python -m pipelines.split brats2023
"""

from __future__ import annotations

import argparse
import json
import random
from collections import defaultdict

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


def make_split(study: str) -> dict:
    """Split the prepared cases of one study and write `data/splits/<study>.json`."""
    config = study_config(study)
    index = json.loads((resolve_path(PREPROCESSED_ROOT) / study / "dataset.json").read_text())
    layout = get_layout(config["dataset"]["layout"])
    spec = config["split"]
    split = patient_split(list(index["cases"]), layout.patient_of, spec["val"], spec["test"], spec["seed"])
    write_json(resolve_path(SPLITS_ROOT) / f"{study}.json", {"seed": spec["seed"], **split})
    print("split: " + ", ".join(f"{name} {len(ids)}" for name, ids in split.items()))
    return split


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("study", help="key under `studies` in params.yaml")
    make_split(parser.parse_args().study)


if __name__ == "__main__":
    main()
