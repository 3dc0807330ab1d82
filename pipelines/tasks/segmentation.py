"""Segmentation (BraTS, AMOS, nnU-Net datasets): planned preprocessing, patch training, Dice selection,
test metrics in the raw geometry, and the paper's Tables 1 and 2.

- prepare: nnU-Net-style fingerprint and plan (target spacing, per-channel normalisation, patch
  and batch size within `plan.memory_budget_gb`), then every case preprocessed with the plan.
- train: foreground-oversampled random patches; validation is whole-volume sliding-window Dice
  averaged over the study's regions.
- evaluate: each prediction is mapped back onto the raw image grid (class probabilities where the
  plan resampled) and scored against the raw label file with its voxel spacing, per region
  (BraTS) or per class (organ datasets, names from dataset.json). Unlabelled test cases (AMOS
  imagesTs, scored on the challenge site) are predicted, not scored.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
import torchio as tio
from torch import nn

from nnmamba.complexity import TrainingMemory, measure_training_memory
from nnmamba.data.cases import RawDataset
from nnmamba.data.layouts import get_layout
from nnmamba.data.loading.sampling import make_patch_loader
from nnmamba.data.preprocessing.fingerprint import dataset_fingerprint
from nnmamba.data.preprocessing.plan import Preprocessing, make_plan
from nnmamba.data.preprocessing.preprocess import DATASET_JSON, load_preprocessed, prepare_dataset
from nnmamba.data.splits import split_cases, with_folds
from nnmamba.engine import amp_dtype, validation_dice
from nnmamba.ensemble import load_models
from nnmamba.losses import build_loss
from nnmamba.metrics import per_class_regions, segmentation_metrics
from nnmamba.models import available_variants, build_model
from nnmamba.predict import file_ending, save_label_map, segment_preprocessed
from pipelines import workspace
from pipelines.params import ReportSpec, StudySpec
from pipelines.tasks import Evaluator, Scored, Task
from pipelines.tasks.scoring import evaluation_device, mean_per_seed


def largest_training_memory(study: StudySpec, in_channels: int, out_channels: int) -> TrainingMemory:
    """Training memory of the study's architecture, the largest term over all of the task's variants.

    Planning precedes the choice of `train.variants`, so the patch must fit the hungriest one.
    """
    measured = [
        measure_training_memory(build_model(study.task, variant, in_channels, out_channels, **study.model.kwargs()),
                                in_channels)
        for variant in available_variants(study.task)
    ]
    return TrainingMemory(*(max(getattr(m, field) for m in measured)
                            for field in ("fixed_bytes", "per_sample_bytes", "bytes_per_voxel")))


def plan_study(study: StudySpec, raw: RawDataset) -> tuple[dict, dict]:
    """The fingerprint of the raw dataset and the plan derived from it."""
    prepare = study.prepare
    fingerprint = dataset_fingerprint(raw.cases, raw.labels, raw.channels,
                                      prepare.fingerprint_samples_per_case, prepare.fingerprint_seed,
                                      workers=prepare.workers)
    memory = largest_training_memory(study, len(raw.channels), len(raw.labels))
    plan = make_plan(fingerprint, study.plan, memory, prepare.crop_margin, prepare.image_interpolation)
    return fingerprint, plan


def prepare(study: StudySpec, raw: RawDataset, out_dir: Path) -> dict:
    """Plan the study, then preprocess every case with the plan's normalisation and spacing."""
    fingerprint, plan = plan_study(study, raw)
    print(f"prepare: plan for {study.name}: spacing {plan['target_spacing']}, patch {plan['patch_size']}, "
          f"batch {plan['batch_size']}, normalisation {[n['scheme'] for n in plan['normalization']]}")
    return prepare_dataset(raw.cases, out_dir, label_values=raw.labels, crop_margin=study.prepare.crop_margin,
                           preprocessing=Preprocessing.from_plan(plan),
                           metadata={workspace.FINGERPRINT_FILE: fingerprint, workspace.PLAN_FILE: plan},
                           workers=study.prepare.workers)


def split(study: StudySpec, index: dict) -> dict[str, list[str]]:
    """Patient-level random split of the labelled cases (or k folds of them), or the dataset's own folders."""
    spec, patient_of = study.split, get_layout(study.dataset.layout).patient_of
    if spec.method == "kfold":
        held_out = split_cases(index, patient_of, "random", 0, spec.test, spec.seed, require_labels=True)
        return with_folds(held_out, patient_of, spec.folds, spec.seed)
    return split_cases(index, patient_of, spec.method, spec.val, spec.test, spec.seed, require_labels=True)


def resolve(study: StudySpec, index: dict) -> StudySpec:
    """`label_probabilities: uniform`: every label equally likely as a patch centre (nnU-Net-style
    oversampling of rare organs); no `evaluate.regions`: one region per foreground class."""
    train, evaluate = study.train, study.evaluate
    if train.label_probabilities == "uniform":
        train = train.model_copy(update={"label_probabilities": {int(value): 1.0 for value in index["labels"]}})
    if not evaluate.regions:
        evaluate = evaluate.model_copy(update={"regions": per_class_regions(index["labels"])})
    return study.model_copy(update={"train": train, "evaluate": evaluate})


def train_loader(study: StudySpec, dataset_dir: Path, index: dict, case_ids: list[str], seed: int, rank: int,
                 world_size: int, pin_memory: bool = False) -> Iterable[Mapping[str, torch.Tensor]]:
    """Foreground-oversampled random patches of the training cases, batched in the loader workers.

    Images come in the autocast dtype when training with one (see `make_patch_loader`)."""
    train, cases = study.train, [index["cases"][c] for c in case_ids]
    return make_patch_loader(
        image_paths=[dataset_dir / c["image"] for c in cases],
        label_paths=[dataset_dir / c["label"] for c in cases],
        **train.patch_sampling(),
        seed=seed,
        rank=rank,
        world_size=world_size,
        pin_memory=pin_memory,
        image_dtype=amp_dtype(train.amp) or torch.float32,
        passes=None,   # fixed-step epochs: the workers fetch on across the end of each pass
    )


def validate(model: nn.Module, dataset_dir: Path, case_ids: list[str], study: StudySpec,
             device: torch.device, dtype: torch.dtype | None) -> list[dict[str, Any]]:
    """Whole-volume sliding-window Dice, averaged over the study's regions, per validation case."""
    subjects = (load_preprocessed(dataset_dir, case_id) for case_id in case_ids)
    pairs = ((s["image"].data, s["label"].data) for s in subjects)
    scores = validation_dice(model, pairs, study.evaluate.regions, study.train.patch_size, study.train.val_overlap,
                             device, dtype)
    return [{"case_id": case_id, "dice": score} for case_id, score in zip(case_ids, scores)]


def summarise(records: list[dict[str, Any]]) -> dict[str, float]:
    return {"val_dice_mean": sum(r["dice"] for r in records) / max(len(records), 1)}


def score(model_dirs: list[str], dataset_dir: str, case_ids: list[str], study: StudySpec) -> Scored:
    """Score one trained model (or the fold ensemble of several) on the given cases: per case
    (metrics row, (prediction in raw geometry, raw file ending)).

    Unlabelled cases get a row with their id only.
    """
    device = evaluation_device()
    model, _ = load_models(model_dirs, device)
    evaluate = study.evaluate
    index = json.loads((Path(dataset_dir) / DATASET_JSON).read_text())
    scored = []
    for case_id in case_ids:
        entry = index["cases"][case_id]
        subject = load_preprocessed(Path(dataset_dir), case_id)
        first_image = Path(next(iter(entry["raw_images"].values())))
        # The raw label, read once: the grid to predict on and the truth to score against.
        truth = tio.LabelMap(entry["raw_label"]) if entry["raw_label"] is not None else None
        started = time.perf_counter()
        prediction = segment_preprocessed(model, subject["image"].data, entry["properties"],
                                          first_image if truth is None else truth,
                                          study.train.patch_size, overlap=evaluate.overlap,
                                          mirror_axes=evaluate.mirror_axes, device=device)
        predicted = time.perf_counter()
        row = {"case_id": case_id}
        if truth is not None:
            metrics = segmentation_metrics(prediction.numpy()[0], truth.numpy()[0], truth.spacing,
                                           evaluate.regions, evaluate.nsd_tolerance_mm)
            row.update({f"test_{k}": v for k, v in metrics.items()})
        print(f"evaluate: {case_id} predicted in {predicted - started:.2f} s, scored in "
              f"{time.perf_counter() - predicted:.2f} s", flush=True)
        scored.append((row, (prediction, file_ending(first_image))))
    return scored


def save_label_maps(scored: Scored, out_root: Path, trial: str) -> None:
    """Each label map as `<trial>/<case><ending>`, in the raw image's own format (.nii.gz, .nrrd, .mha, ...)."""
    (out_root / trial).mkdir(parents=True, exist_ok=True)
    for row, (labels, ending) in scored:
        save_label_map(labels, out_root / trial / f"{row['case_id']}{ending}")


def report(studies: list[StudySpec], settings: ReportSpec, out_dir: Path) -> list[Path]:
    """Table 1 per study, Table 2 per organ dataset (matplotlib loads in the report stage only)."""
    from pipelines.reports.segmentation import segmentation_reports

    return segmentation_reports(studies, settings, out_dir)


def prediction_record(study: StudySpec, index: dict) -> dict:
    """The plan (normalisation, spacing, crop margin), channels, labels and sliding-window settings, the
    span of the training images' intensities."""
    return {"task": study.task, "channels": index["channels"], "labels": index["labels"],
            "plan": workspace.load_plan(study.name), "patch_size": list(study.train.patch_size),
            "overlap": study.evaluate.overlap, "mirror_axes": list(study.evaluate.mirror_axes),
            "intensity_ranges": index["intensity_ranges"]}


TASK = Task(
    name="segmentation",
    mlflow_prefix="seg",
    selection_metric="val_dice_mean",
    selection_mode="max",
    prepare=prepare,
    split=split,
    resolve=resolve,
    train_loader=train_loader,
    loss=lambda train, terms: build_loss("segmentation", terms=terms or "dice_ce"),
    validate=validate,
    summarise=summarise,
    input_shape=lambda study: study.train.patch_size,
    prediction_record=prediction_record,
    evaluator=Evaluator(score, save_label_maps, mean_per_seed, headline="test_dice_mean"),
    report=report,
)
