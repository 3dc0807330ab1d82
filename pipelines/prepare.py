"""DVC stage `prepare@<study>`: read the raw dataset, validate every case, preprocess, write atomically.

Output: `data/preprocessed/<study>/` (images/, labels/, dataset.json and, for segmentation
studies, fingerprint.json and plan.json). What preprocessing means is the task's
(pipelines/tasks/): a segmentation study is planned nnU-Net style first (fingerprint of the
labelled cases -> target spacing, per-channel normalisation, patch and batch size within
`plan.memory_budget_gb`); landmark and classification studies are resampled to one spacing (and,
for classification, one shape). Any bad case stops the stage with one error naming the case and
the problem; an earlier output stays as it was.

    python -m pipelines.prepare brats2023
"""

from __future__ import annotations

import argparse
import sys

from nnmamba.data.cases import RawDataset
from nnmamba.data.errors import DataError
from nnmamba.data.layouts import get_layout
from pipelines import workspace
from pipelines.params import StudySpec, load_params
from pipelines.tasks import get_task


def read_raw(study: StudySpec) -> RawDataset:
    """The study's raw dataset through its layout's reader (`dataset.reader` holds reader options)."""
    layout = get_layout(study.dataset.layout)
    return layout.read(workspace.resolve(study.dataset.root), **study.dataset.reader)


def prepare(name: str) -> dict:
    """Preprocess one study's raw dataset into `data/preprocessed/<study>`."""
    study = load_params().study(name)
    raw = read_raw(study)
    out_dir = workspace.path(workspace.PREPROCESSED, study=name)
    index = get_task(study.task).prepare(study, raw, out_dir)
    print(f"prepare: {len(raw.cases)} cases of {name} -> {out_dir}")
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
