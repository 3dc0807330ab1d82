"""DVC stage `prepare@<study>`: read the raw dataset, validate every case, preprocess, write atomically.

Output: `data/preprocessed/<study>/` (images/, labels/, dataset.json); for classification, whole
volumes of one shape and spacing with each case's class in dataset.json. Any bad case stops the stage
with one error naming the case and the problem; an earlier output stays as it was.

    python -m pipelines.prepare brats2023
"""

from __future__ import annotations

import argparse
import sys

from nnmamba.data.errors import DataError
from nnmamba.data.layouts import get_layout
from nnmamba.data.preprocess import prepare_dataset
from nnmamba.data.whole_volume import prepare_classification_dataset
from pipelines.config import resolve_path, study_config

PREPROCESSED_ROOT = "data/preprocessed"


def prepare(study: str) -> dict:
    """Preprocess one study's raw dataset into `data/preprocessed/<study>`."""
    config = study_config(study)
    dataset = config["dataset"]
    layout = get_layout(dataset["layout"])
    cases = layout.find_cases(resolve_path(dataset["root"]))
    out_dir = resolve_path(PREPROCESSED_ROOT) / study
    spec = config["prepare"]
    if config["task"] == "classification":
        index = prepare_classification_dataset(cases, out_dir, dataset["classes"], spec["spacing"], spec["shape"])
    else:
        index = prepare_dataset(cases, out_dir, label_values=layout.labels, crop_margin=spec["crop_margin"])
    print(f"prepare: {len(index['cases'])} cases of {study} -> {out_dir}")
    return index


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("study", help="key under `studies` in params.yaml")
    try:
        prepare(parser.parse_args().study)
    except DataError as error:
        sys.exit(f"prepare: {error}")


if __name__ == "__main__":
    main()
