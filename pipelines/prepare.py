"""DVC stage `prepare@<study>`: read the raw dataset, validate every case, preprocess, write atomically.

Output: `data/preprocessed/<study>/` (images/, labels/, dataset.json). Any bad case stops the stage
with one error naming the case and the problem; an earlier output stays as it was.

    python -m pipelines.prepare brats2023
"""

from __future__ import annotations

import argparse
import sys

from pathlib import Path

from nnmamba.data.cases import CaseFiles
from nnmamba.data.errors import DataError
from nnmamba.data.landmark_preprocess import prepare_landmark_dataset
from nnmamba.data.layouts import Layout, get_layout
from nnmamba.data.preprocess import prepare_dataset
from pipelines.config import resolve_path, study_config

PREPROCESSED_ROOT = "data/preprocessed"


def prepare(study: str) -> dict:
    """Preprocess one study's raw dataset into `data/preprocessed/<study>`."""
    config = study_config(study)
    dataset = config["dataset"]
    layout = get_layout(dataset["layout"])
    cases = layout.find_cases(resolve_path(dataset["root"]))
    out_dir = resolve_path(PREPROCESSED_ROOT) / study
    index = PREPARERS[config["task"]](config, layout, cases, out_dir)
    print(f"prepare: {len(cases)} cases of {study} -> {out_dir}")
    return index


def prepare_segmentation(config: dict, layout: Layout, cases: list[CaseFiles], out_dir: Path) -> dict:
    return prepare_dataset(cases, out_dir, label_values=layout.labels, crop_margin=config["prepare"]["crop_margin"])


def prepare_landmarks(config: dict, layout: Layout, cases: list[CaseFiles], out_dir: Path) -> dict:
    """The layout's labels are the landmark names, in the network's output-channel order."""
    return prepare_landmark_dataset(cases, out_dir, names=list(layout.labels.values()),
                                    spacing=config["prepare"]["spacing"], crop_margin=config["prepare"]["crop_margin"])


PREPARERS = {"segmentation": prepare_segmentation, "landmark": prepare_landmarks}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("study", help="key under `studies` in params.yaml")
    try:
        prepare(parser.parse_args().study)
    except DataError as error:
        sys.exit(f"prepare: {error}")


if __name__ == "__main__":
    main()
