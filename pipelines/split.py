"""DVC stage `split@<study>`: a seeded, patient-level train/val/test split saved as JSON.

`split.method: random` (default): all cases of one patient land in the same split, so no patient
leaks from training into testing. Sizes are case counts (int) or fractions (< 1) of the labelled
cases; train gets the rest. `split.method: folders`: the split the dataset ships (AMOS imagesTr ->
train, imagesVa -> val, imagesTs -> test); where it ships no validation folder, `split.val` cases
are drawn (seeded) from its training folder. Classification studies (`split.method: random`) are
also stratified by class, so every split has the dataset's class balance (and AUC is defined on
val and test). `val: 0` means no validation split: training then keeps the last epoch. The
algorithms are the library's (nnmamba/data/splits.py); which one a study uses is its task's.

    python -m pipelines.split brats2023
"""

from __future__ import annotations

import argparse
import sys

from nnmamba.data.errors import DataError
from pipelines import workspace
from pipelines.params import load_params
from pipelines.tasks import get_task


def make_split(name: str) -> dict:
    """Split the prepared cases of one study and write `data/splits/<study>.json`."""
    study = load_params().study(name)
    split = get_task(study.task).split(study, workspace.load_index(name))
    workspace.write_json(workspace.path(workspace.SPLIT, study=name), {"seed": study.split.seed, **split})
    print("split: " + ", ".join(f"{part} {len(ids)}" for part, ids in split.items()))
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
