"""Fingerprint against a NiBabel/NumPy reference, the plan's rules on hand-built fingerprints, memory and MAC models."""

from __future__ import annotations

import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from nnmamba.complexity import _saved_activation_bytes, count_macs, measure_macs, measure_training_memory
from nnmamba.data.synthetic.abdomen_phantom import AMOS_LABELS
from nnmamba.data.readers.amos import read_amos_dataset
from nnmamba.data.readers.brats import BRATS_LABELS, find_brats_cases
from nnmamba.data.errors import DataError
from nnmamba.data.preprocessing.fingerprint import dataset_fingerprint
from nnmamba.data.preprocessing.plan import PlanSettings, Preprocessing, make_plan
from nnmamba.data.synthetic.brats import write_synthetic_brats
from nnmamba.data.synthetic.amos import write_synthetic_amos
from nnmamba.models import build_model

SAMPLES = 500
SEED = 3


@pytest.fixture(scope="module")
def amos_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("amos")
    write_synthetic_amos(root, {"CT": {"imagesTr": 3, "imagesTs": 1}, "MR": {"imagesTr": 2}},
                         field_of_view_mm=(120.0, 96.0, 96.0), seed=5)
    return root


def _reference_case(image_path: Path, label_path: Path, index: int) -> dict:
    """Brute force with NiBabel: canonical arrays, nonzero box, foreground samples drawn like the fingerprint."""
    image = nib.as_closest_canonical(nib.load(image_path))
    data = np.asarray(image.dataobj, dtype=np.float64)
    labels = np.asarray(nib.as_closest_canonical(nib.load(label_path)).dataobj)
    nonzero = np.argwhere(data != 0)
    foreground = data[labels > 0]  # C order over the canonical array, as torch boolean indexing
    picks = np.random.default_rng([SEED, index]).integers(0, foreground.size, size=SAMPLES)
    return {
        "spacing": [float(z) for z in image.header.get_zooms()],
        "crop": (nonzero.max(axis=0) - nonzero.min(axis=0) + 1).tolist(),
        "relative": np.prod(nonzero.max(axis=0) - nonzero.min(axis=0) + 1) / data.size,
        "samples": foreground[picks],
        "counts": {int(v): int((labels == v).sum()) for v in np.unique(labels)},
    }


def test_fingerprint_matches_brute_force(amos_root: Path) -> None:
    dataset = read_amos_dataset(amos_root, "CT", ("imagesTr", "imagesTs"))
    fingerprint = dataset_fingerprint(dataset.cases, dataset.labels, dataset.channels, SAMPLES, SEED, progress=False)
    labelled = [c for c in dataset.cases if c.label is not None]
    assert fingerprint["n_cases"] == 3 and sorted(fingerprint["cases"]) == [c.case_id for c in labelled]
    references = [_reference_case(c.images["CT"], c.label, i) for i, c in enumerate(labelled)]
    for case, reference in zip(labelled, references):
        entry = fingerprint["cases"][case.case_id]
        np.testing.assert_allclose(entry["spacing"], reference["spacing"], rtol=1e-6)
        assert entry["shape_after_crop"] == reference["crop"]
    np.testing.assert_allclose(fingerprint["median_spacing"], np.median([r["spacing"] for r in references], axis=0))
    relative = np.median([r["relative"] for r in references])
    assert fingerprint["median_relative_size_after_crop"] == pytest.approx(relative)
    samples = np.concatenate([r["samples"] for r in references])
    stats = fingerprint["foreground_intensity"]["CT"]
    assert stats["mean"] == pytest.approx(samples.mean()) and stats["std"] == pytest.approx(samples.std())
    assert stats["percentile_00_5"] == pytest.approx(np.percentile(samples, 0.5))
    assert stats["percentile_99_5"] == pytest.approx(np.percentile(samples, 99.5))
    assert (stats["min"], stats["max"]) == (samples.min(), samples.max())
    total = sum(sum(r["counts"].values()) for r in references)
    for value, name in AMOS_LABELS.items():
        frequency = fingerprint["class_frequencies"][str(value)]
        assert frequency["name"] == name
        assert frequency["voxel_fraction"] == pytest.approx(sum(r["counts"].get(value, 0) for r in references) / total)
        assert frequency["case_fraction"] == pytest.approx(np.mean([value in r["counts"] for r in references]))


def test_fingerprint_rejects_datasets_without_labels(amos_root: Path) -> None:
    dataset = read_amos_dataset(amos_root, "CT", ("imagesTs",))
    with pytest.raises(DataError, match="no labelled cases to fingerprint"):
        dataset_fingerprint(dataset.cases, dataset.labels, dataset.channels, SAMPLES, SEED, progress=False)


def _fingerprint(spacings: list[list[float]], crops: list[list[int]], channels=("CT",), relative: float = 1.0) -> dict:
    return {
        "n_cases": len(spacings),
        "channels": list(channels),
        "median_relative_size_after_crop": relative,
        "foreground_intensity": {c: {"mean": 60.0, "std": 20.0, "percentile_00_5": -10.0, "percentile_99_5": 250.0}
                                 for c in channels},
        "cases": {f"c{i}": {"spacing": s, "shape_after_crop": c} for i, (s, c) in enumerate(zip(spacings, crops))},
    }


def voxel_memory(bytes_per_voxel: float):
    """A memory model that is easy to reason about: bytes per voxel of the batch."""
    return lambda patch, batch: batch * math.prod(patch) * bytes_per_voxel


def test_target_spacing_is_the_median_or_the_coarse_axis_percentile() -> None:
    settings = PlanSettings(memory_budget_gb=1.0)
    isotropic = _fingerprint([[1.0, 1.0, 2.0], [1.2, 1.2, 2.5], [0.8, 0.8, 3.0]], [[100, 100, 50]] * 3)
    plan = make_plan(isotropic, settings, voxel_memory(1.0), crop_margin=2)
    assert plan["target_spacing"] == pytest.approx([1.0, 1.0, 2.5])
    # 0.8 x 0.8 x 6.5 mm scans: the 6.5 mm axis has far fewer voxels, so it takes the 10th percentile.
    thick = [[0.8, 0.8, 6.5], [0.8, 0.8, 5.0], [0.8, 0.8, 6.5], [0.8, 0.8, 6.5], [0.8, 0.8, 4.0]]
    plan = make_plan(_fingerprint(thick, [[400, 400, 30]] * 5), settings, voxel_memory(1.0), crop_margin=2)
    assert plan["target_spacing"] == pytest.approx([0.8, 0.8, np.percentile([6.5, 5.0, 6.5, 6.5, 4.0], 10)])
    fixed = make_plan(_fingerprint(thick, [[400, 400, 30]] * 5), PlanSettings(1.0, target_spacing=[1, 1, 3]),
                      voxel_memory(1.0), crop_margin=2)
    assert fixed["target_spacing"] == [1.0, 1.0, 3.0]


def test_patch_and_batch_follow_median_shape_and_memory() -> None:
    fingerprint = _fingerprint([[1.0, 1.0, 1.0]] * 4, [[100, 70, 20]] * 4)
    roomy = make_plan(fingerprint, PlanSettings(memory_budget_gb=1.0, max_batch_size=4), voxel_memory(1.0), 2)
    # The median shape rounded up to multiples of 16; the batch is capped by 5% of the dataset's voxels.
    assert roomy["patch_size"] == [112, 80, 32]
    assert roomy["batch_size"] == 2
    # 300 kB per sample: 112x80x32 at batch 2 does not fit; shrink the axis furthest above the median shape.
    budget_gb = 2 * 300_000 / 1024**3
    tight = make_plan(fingerprint, PlanSettings(memory_budget_gb=budget_gb), voxel_memory(1.0), 2)
    # 32/20 > 80/70 > 112/100: z shrinks first (to 16), then x and y by the same rule, until 2 * voxels fit.
    expected = np.array([112, 80, 32])
    while 2 * expected.prod() > 300_000 * 2:
        ratios = np.where(expected > 16, expected / np.array([100, 70, 20]), -np.inf)
        expected[np.argmax(ratios)] -= 16
    assert tight["patch_size"] == expected.tolist() and all(p % 16 == 0 for p in tight["patch_size"])
    assert tight["memory"]["estimated_bytes"] <= tight["memory"]["budget_bytes"]
    many = _fingerprint([[1.0, 1.0, 1.0]] * 400, [[100, 70, 20]] * 400)
    big_batch = make_plan(many, PlanSettings(memory_budget_gb=1.0, max_batch_size=6), voxel_memory(1.0), 2)
    assert big_batch["batch_size"] == 6
    with pytest.raises(ValueError, match="cannot hold a 16\\^3 patch"):
        make_plan(fingerprint, PlanSettings(memory_budget_gb=1e-6), voxel_memory(1.0), 2)


def test_normalisation_rules() -> None:
    ct = make_plan(_fingerprint([[1, 1, 1]], [[32, 32, 32]], ("CT", "T2")), PlanSettings(1.0), voxel_memory(1.0), 2)
    assert ct["normalization"] == [
        {"channel": "CT", "scheme": "ct", "mean": 60.0, "std": 20.0, "clip": [-10.0, 250.0]},
        {"channel": "T2", "scheme": "zscore"},
    ]
    brain = make_plan(_fingerprint([[1, 1, 1]], [[32, 32, 32]], ("t1c",), relative=0.6), PlanSettings(1.0),
                      voxel_memory(1.0), 2)
    assert brain["normalization"] == [{"channel": "t1c", "scheme": "nonzero_zscore"}]
    assert Preprocessing.from_plan(brain).normalization == Preprocessing.head_mask(1).normalization


def test_brats_plan_keeps_head_mask_zscore_at_native_spacing(tmp_path: Path) -> None:
    write_synthetic_brats(tmp_path, n_cases=2, shape=(32, 32, 24), seed=1)
    cases = find_brats_cases(tmp_path)
    fingerprint = dataset_fingerprint(cases, BRATS_LABELS, ["t1c", "t1n", "t2f", "t2w"], SAMPLES, SEED, progress=False)
    plan = make_plan(fingerprint, PlanSettings(1.0), voxel_memory(1.0), 2)
    preprocessing = Preprocessing.from_plan(plan)
    assert [n.scheme for n in preprocessing.normalization] == ["nonzero_zscore"] * 4
    assert not preprocessing.needs_resampling([1.0, 1.0, 1.0])


@pytest.mark.parametrize("variant", ["baseline", "miccss"])
def test_memory_and_macs_are_affine_in_voxels(variant: str) -> None:
    model = build_model("segmentation", variant, 2, 4, base_channels=4, blocks_per_stage=2)
    macs = measure_macs(model, 2)
    assert macs((32, 16, 48)) == count_macs(model, (1, 2, 32, 16, 48))
    memory = measure_training_memory(model, 2)
    assert memory.fixed_bytes == 4 * sum(p.numel() * 4 for p in model.parameters())  # weights, grads, Adam m and v
    # The two-probe fit predicts (to 1%: the SSM scan allocates in chunks) what a forward pass at another size
    # keeps for backward.
    measured = _saved_activation_bytes(model, (2, 2, 32, 16, 48)) / 2
    assert memory((32, 16, 48), 1) - memory.fixed_bytes == pytest.approx(measured, rel=0.01)
    assert memory.bytes_per_voxel > 0
    if variant == "miccss":
        baseline = measure_training_memory(build_model("segmentation", "baseline", 2, 4, base_channels=4,
                                                       blocks_per_stage=2), 2)
        assert memory.bytes_per_voxel > baseline.bytes_per_voxel
