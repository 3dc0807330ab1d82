"""DVC stage `prepare@<study>`: read the raw dataset, validate every case, plan, preprocess, write atomically.

Output: `data/preprocessed/<study>/` (images/, labels/, dataset.json and, for segmentation
studies, fingerprint.json and plan.json). A segmentation study is planned nnU-Net style first:
the fingerprint of the labelled cases (spacings, shapes, foreground intensities, class
frequencies) gives the plan (target spacing, per-channel normalisation, patch and batch size
within `plan.memory_budget_gb`), and the plan's preprocessing is applied to every case. Any bad
case stops the stage with one error naming the case and the problem; an earlier output stays as
it was. For classification: whole volumes of one shape and spacing with each case's class in
dataset.json.

    python -m pipelines.prepare brats2023
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from nnmamba.complexity import TrainingMemory, measure_training_memory
from nnmamba.data.cases import RawDataset
from nnmamba.data.errors import DataError
from nnmamba.data.preprocessing.fingerprint import dataset_fingerprint
from nnmamba.data.preprocessing.landmarks import prepare_landmark_dataset
from nnmamba.data.layouts import get_layout
from nnmamba.data.preprocessing.plan import PlanSettings, Preprocessing, make_plan
from nnmamba.data.preprocessing.preprocess import prepare_dataset
from nnmamba.data.preprocessing.whole_volume import prepare_classification_dataset
from nnmamba.models import available_variants, build_model
from pipelines.config import resolve_path, study_config

PREPROCESSED_ROOT = "data/preprocessed"
FINGERPRINT_FILE = "fingerprint.json"
PLAN_FILE = "plan.json"


def read_raw(config: dict) -> RawDataset:
    """The study's raw dataset through its layout's reader (`dataset.reader` holds reader options)."""
    dataset = config["dataset"]
    layout = get_layout(dataset["layout"])
    return layout.read(resolve_path(dataset["root"]), **dataset.get("reader", {}))


def prepare(study: str) -> dict:
    """Preprocess one study's raw dataset into `data/preprocessed/<study>`."""
    config = study_config(study)
    raw = read_raw(config)
    out_dir = resolve_path(PREPROCESSED_ROOT) / study
    index = PREPARERS[config["task"]](config, raw, out_dir)
    print(f"prepare: {len(raw.cases)} cases of {study} -> {out_dir}")
    return index


def largest_training_memory(config: dict, in_channels: int, out_channels: int) -> TrainingMemory:
    """Training memory of the study's architecture, the largest term over all of the task's variants.

    Planning precedes the choice of `train.variants`, so the patch must fit the hungriest one.
    """
    task = config["task"]
    measured = [
        measure_training_memory(build_model(task, variant, in_channels, out_channels, **config["model"]), in_channels)
        for variant in available_variants(task)
    ]
    return TrainingMemory(*(max(getattr(m, field) for m in measured)
                            for field in ("fixed_bytes", "per_sample_bytes", "bytes_per_voxel")))


def plan_study(config: dict, raw: RawDataset) -> tuple[dict, dict]:
    """The fingerprint of the raw dataset and the plan derived from it."""
    prepare_cfg = config["prepare"]
    fingerprint = dataset_fingerprint(raw.cases, raw.labels, raw.channels,
                                      prepare_cfg["fingerprint_samples_per_case"], prepare_cfg["fingerprint_seed"])
    memory = largest_training_memory(config, len(raw.channels), len(raw.labels))
    plan = make_plan(fingerprint, PlanSettings.from_params(config["plan"]), memory,
                     prepare_cfg["crop_margin"], prepare_cfg["image_interpolation"])
    return fingerprint, plan


def prepare_segmentation(config: dict, raw: RawDataset, out_dir: Path) -> dict:
    """Plan the study, then preprocess every case with the plan's normalisation and spacing."""
    fingerprint, plan = plan_study(config, raw)
    print(f"prepare: plan for {config['study']}: spacing {plan['target_spacing']}, patch {plan['patch_size']}, "
          f"batch {plan['batch_size']}, normalisation {[n['scheme'] for n in plan['normalization']]}")
    return prepare_dataset(raw.cases, out_dir, label_values=raw.labels, crop_margin=config["prepare"]["crop_margin"],
                           preprocessing=Preprocessing.from_plan(plan),
                           metadata={FINGERPRINT_FILE: fingerprint, PLAN_FILE: plan})


def prepare_landmarks(config: dict, raw: RawDataset, out_dir: Path) -> dict:
    """The layout's labels are the landmark names, in the network's output-channel order."""
    return prepare_landmark_dataset(raw.cases, out_dir, names=list(raw.labels.values()),
                                    spacing=config["prepare"]["spacing"], crop_margin=config["prepare"]["crop_margin"])


def prepare_classification(config: dict, raw: RawDataset, out_dir: Path) -> dict:
    """Whole volumes resampled to one spacing and shape; `dataset.classes` orders the class indices."""
    spec = config["prepare"]
    return prepare_classification_dataset(raw.cases, out_dir, config["dataset"]["classes"], spec["spacing"],
                                          spec["shape"])


PREPARERS = {"segmentation": prepare_segmentation, "landmark": prepare_landmarks,
             "classification": prepare_classification}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("study", help="key under `studies` in params.yaml")
    try:
        prepare(parser.parse_args().study)
    except DataError as error:
        sys.exit(f"prepare: {error}")


if __name__ == "__main__":
    main()
