"""Synthetic ADNI-like T1 scans and manifest, written as real files in the ADNI layout.

Why: the classification studies must run end to end without the licensed ADNI data, on a class
signal that a purely local feature cannot solve. Each scan is a head (scalp, CSF, grey and white
matter) with two lateral ventricles near the top and two hippocampi low in the temporal lobes.
Two findings exist: atrophy of the LEFT hippocampus (it shrinks, CSF fills the space) and
enlargement of the RIGHT lateral ventricle, far apart in the volume. Positive classes (AD,
pMCI) have BOTH; negative classes (NC, sMCI) have neither or exactly one (subjects cycle through
none / atrophy only / enlargement only), so a network must combine evidence from opposite ends of
the brain. MCI findings are weaker than AD's
(the transfer task is harder, as in the paper's Table 3). A subject may have a second visit
(m12) with the same anatomy, slightly progressed findings and fresh noise.

Cases are drawn from an RNG seeded by (seed, class, subject index), so changing one class's
count leaves the other classes' scans unchanged. Like the BraTS generator, odd subjects are
stored in a permuted orientation (PIR) and volumes are int16, 0 outside the head.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from nnmamba.data.readers.adni import ADNI_DIAGNOSES, MANIFEST_NAME, adni_case_id
from nnmamba.data.synthetic.orientation import centred_ras_affine, write_oriented_nifti
from nnmamba.data.synthetic.brats import (
    BACKGROUND,
    CSF,
    SYNTHETIC_ORIENTATIONS,
    ellipsoid_radius,
    paint_head_layers,
    smooth_field,
)

POSITIVE = {"AD": True, "pMCI": True, "NC": False, "sMCI": False}
# Strength of the findings: AD/NC scans vs MCI scans.
FINDING_STRENGTH = {"NC": 1.0, "AD": 1.0, "sMCI": 0.6, "pMCI": 0.6}
ATROPHY_SHRINK = 0.5          # hippocampal semi-axes x (1 - shrink * strength)
ENLARGEMENT_GROWTH = 1.0      # ventricle semi-axes x (1 + growth * strength)
PROGRESSION = 0.15            # extra strength of a finding at the second visit
NATURAL_VARIATION = 0.08      # relative size jitter of every structure, findings or not
VISITS = ("bl", "m12")

HIPPOCAMPUS = 5               # tissue code after synthetic.py's BACKGROUND, SCALP, CSF, GREY, WHITE
T1_INTENSITY = np.array([0.0, 0.55, 0.20, 0.55, 0.75, 0.60]) * 1000.0
WHITE_OUTER = 0.62            # white matter radius relative to the head surface (BraTS heads: 0.66)
NOISE_STD, TEXTURE_STD, BIAS_STRENGTH = 0.02, 0.04, 0.25
# Structure centres and semi-axes as fractions of the brain's semi-axes (RAS; x < 0 is left).
VENTRICLE_CENTRE, VENTRICLE_SEMI = np.array([0.16, 0.05, 0.20]), np.array([0.10, 0.30, 0.15])
HIPPOCAMPUS_CENTRE, HIPPOCAMPUS_SEMI = np.array([0.45, -0.10, -0.40]), np.array([0.17, 0.32, 0.17])
TEMPORAL_HORN = 1.35          # CSF around a hippocampus, relative to its healthy size


def write_synthetic_adni(
    root: Path,
    subjects: dict[str, int],
    second_visit_fraction: float = 0.25,
    shape: tuple[int, int, int] = (48, 48, 40),
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.2),
    seed: int = 0,
) -> list[str]:
    """Write ``subjects[diagnosis]`` subjects per diagnosis and ``root/manifest.csv``; return the case ids.

    ``shape`` and ``spacing`` are in RAS axis order, as for the BraTS generator.
    """
    unknown = sorted(set(subjects) - set(ADNI_DIAGNOSES))
    if unknown:
        raise ValueError(f"unknown diagnoses {unknown}; expected some of {list(ADNI_DIAGNOSES)}")
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for class_index, diagnosis in enumerate(ADNI_DIAGNOSES):
        for index in range(subjects.get(diagnosis, 0)):
            rows += _write_subject(root, diagnosis, class_index, index, second_visit_fraction, shape, spacing, seed)
    with (root / MANIFEST_NAME).open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["subject", "visit", "image", "diagnosis"])
        writer.writeheader()
        writer.writerows(rows)
    return [adni_case_id(row["subject"], row["visit"]) for row in rows]


def _write_subject(root: Path, diagnosis: str, class_index: int, index: int, second_visit_fraction: float,
                   shape: tuple[int, int, int], spacing: tuple[float, float, float], seed: int) -> list[dict]:
    """One subject's visits: the same anatomy and findings, progressing, with fresh noise per visit."""
    rng = np.random.default_rng([seed, class_index, index])
    subject = f"{100 + class_index:03d}_S_{index:04d}"
    atrophy, enlargement = _findings(diagnosis, index)
    anatomy = {"head": rng.uniform(0.95, 1.05, 3), "sizes": 1 + NATURAL_VARIATION * rng.uniform(-1, 1, 4),
               "fields": rng.integers(2**31, size=2)}
    n_visits = 2 if rng.uniform() < second_visit_fraction else 1
    codes = SYNTHETIC_ORIENTATIONS[(class_index + index) % len(SYNTHETIC_ORIENTATIONS)]
    rows = []
    for visit_index, visit in enumerate(VISITS[:n_visits]):
        progress = PROGRESSION * visit_index
        tissue = _paint_head(shape, spacing, anatomy, atrophy + progress * (atrophy > 0),
                             enlargement + progress * (enlargement > 0))
        image = _t1_image(tissue, np.random.default_rng([seed, class_index, index, visit_index]))
        relative = f"images/{adni_case_id(subject, visit)}.nii.gz"
        write_oriented_nifti(root / relative, image, centred_ras_affine(shape, spacing), codes)
        rows.append({"subject": subject, "visit": visit, "image": relative, "diagnosis": diagnosis})
    return rows


def _findings(diagnosis: str, index: int) -> tuple[float, float]:
    """(atrophy, enlargement) strengths: both for a positive class, none or one for a negative one.

    Negative subjects cycle through the three patterns, so every negative class holds the
    single-finding confounders in equal numbers however few subjects it has.
    """
    strength = FINDING_STRENGTH[diagnosis]
    if POSITIVE[diagnosis]:
        return strength, strength
    pattern = index % 3  # 0: none, 1: atrophy only, 2: enlargement only
    return strength * (pattern == 1), strength * (pattern == 2)


def _paint_head(shape: tuple[int, ...], spacing: tuple[float, ...], anatomy: dict, atrophy: float,
                enlargement: float) -> np.ndarray:
    """Integer tissue map (codes above), RAS voxel order."""
    mm, tissue, brain_semi = paint_head_layers(shape, spacing, anatomy["head"],
                                               np.random.default_rng(anatomy["fields"]), WHITE_OUTER)
    left_ventricle, right_ventricle, left_hippocampus, right_hippocampus = anatomy["sizes"]
    for side, size in ((-1.0, left_ventricle), (1.0, right_ventricle * (1 + ENLARGEMENT_GROWTH * enlargement))):
        centre = brain_semi * VENTRICLE_CENTRE * np.array([side, 1.0, 1.0])
        tissue[ellipsoid_radius(mm, centre, brain_semi * VENTRICLE_SEMI * size) < 1.0] = CSF
    for side, size, shrink in ((-1.0, left_hippocampus, ATROPHY_SHRINK * atrophy), (1.0, right_hippocampus, 0.0)):
        centre = brain_semi * HIPPOCAMPUS_CENTRE * np.array([side, 1.0, 1.0])
        healthy = ellipsoid_radius(mm, centre, brain_semi * HIPPOCAMPUS_SEMI * size)
        tissue[healthy < TEMPORAL_HORN] = CSF
        tissue[healthy < 1.0 - shrink] = HIPPOCAMPUS
    return tissue


def _t1_image(tissue: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """T1 contrast x texture x smooth bias field + noise, int16, exactly 0 outside the head."""
    texture = 1.0 + TEXTURE_STD * smooth_field(tissue.shape, rng, 2.0)
    grid = np.meshgrid(*[np.linspace(-1.0, 1.0, n) for n in tissue.shape], indexing="ij")
    bias = np.exp(BIAS_STRENGTH * sum(c * g for c, g in zip(rng.uniform(-1, 1, 3), grid)) / 2)
    image = T1_INTENSITY[tissue] * texture * bias + NOISE_STD * 1000.0 * rng.standard_normal(tissue.shape)
    return np.where(tissue != BACKGROUND, np.maximum(np.round(image), 1), 0).astype(np.int16)


