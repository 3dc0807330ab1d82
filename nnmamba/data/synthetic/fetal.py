"""Synthetic fetal brains with the six cerebellar landmarks, written as real files in the landmarks layout.

Why: the landmark pipeline must run end to end without the paper's private fetal MRI data, and still
exercise what real data exercises: gzip'd NIfTI with anisotropic voxels, non-RAS orientations,
points in RAS and in LPS JSON files, brain-masked volumes (slice-to-volume reconstructions are 0
outside the brain), and landmarks that sit on visible anatomy so a network can find them.

Each case is a T2-weighted-like fetal brain: a CSF rim around the parenchyma, two lateral ventricles,
and a posterior fossa with two cerebellar hemispheres, the vermis between them, the fourth ventricle
in front of the vermis and the cisterna magna behind. Every structure is an ellipsoid in a
brain-centred frame, jittered per case; the whole brain is then rotated and shifted. The landmarks
are extreme points of those ellipsoids, so their positions are known exactly:

- TCD1 / TCD2: the lateral ends of the left / right cerebellar hemisphere (transverse cerebellar diameter);
- HDV1 / HDV2: the superior / inferior ends of the vermis (vermis height);
- ADV1 / ADV2: the anterior / posterior ends of the vermis (antero-posterior vermis diameter).

A case's RNG is seeded by ``(seed, case index)``, so a case does not change when ``n_cases`` does.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from scipy.spatial.transform import Rotation

from nnmamba.data.readers.landmarks import (
    IMAGES_DIR,
    LANDMARK_NAMES,
    POINTS_DIR,
    POINTS_SUFFIX,
    write_landmarks,
)
from nnmamba.data.synthetic.orientation import centred_ras_affine, write_oriented_nifti
from nnmamba.data.synthetic.brats import smooth_field

SYNTHETIC_CASE_ID = "fetal-{index:04d}"
# On-disk orientations cycled over cases: identity, a flip of two axes, a permutation with flips.
SYNTHETIC_ORIENTATIONS = (("R", "A", "S"), ("L", "P", "S"), ("P", "I", "R"))
# Points files alternate between the two world conventions the reader accepts.
SYNTHETIC_COORDINATE_SYSTEMS = ("RAS", "LPS")

# Tissue codes, painted in this order (later wins), and their T2-weighted relative intensity.
BACKGROUND, CSF, PARENCHYMA, VENTRICLE, CISTERNA, FOURTH_VENTRICLE, HEMISPHERE, VERMIS = range(8)
T2_INTENSITY = (0.0, 1.30, 0.70, 1.30, 1.30, 1.30, 0.50, 0.35)

# Brain semi-axes: a fraction of the smallest field-of-view side, times the brain's proportions (fetal
# brains are longer front to back than wide or high); the parenchyma's radius inside the CSF rim.
BRAIN_FRACTION, BRAIN_PROPORTIONS, PARENCHYMA_RADIUS = 0.40, (0.85, 1.0, 0.85), 0.90
# Structures as (centre, semi-axes), both in units of the brain's semi-axes; x right, y anterior, z superior.
STRUCTURES = {
    "ventricle_left": (VENTRICLE, (-0.25, 0.05, 0.18), (0.09, 0.35, 0.12)),
    "ventricle_right": (VENTRICLE, (0.25, 0.05, 0.18), (0.09, 0.35, 0.12)),
    "cisterna": (CISTERNA, (0.0, -0.80, -0.50), (0.14, 0.10, 0.14)),
    "fourth_ventricle": (FOURTH_VENTRICLE, (0.0, -0.30, -0.40), (0.04, 0.05, 0.06)),
    "hemisphere_left": (HEMISPHERE, (-0.22, -0.50, -0.40), (0.20, 0.20, 0.22)),
    "hemisphere_right": (HEMISPHERE, (0.22, -0.50, -0.40), (0.20, 0.20, 0.22)),
    "vermis": (VERMIS, (0.0, -0.52, -0.38), (0.08, 0.17, 0.22)),
}
# Landmark -> (structure, axis, side): the point is centre + side * semi[axis] along that axis.
LANDMARK_EXTREMES = {
    "TCD1": ("hemisphere_left", 0, -1), "TCD2": ("hemisphere_right", 0, 1),
    "HDV1": ("vermis", 2, 1), "HDV2": ("vermis", 2, -1),
    "ADV1": ("vermis", 1, 1), "ADV2": ("vermis", 1, -1),
}
# Per-case variability: brain size, structure size and position, pose, and image degradations.
BRAIN_SCALE, STRUCTURE_SCALE, STRUCTURE_SHIFT = (0.92, 1.05), (0.90, 1.10), 0.02
MAX_ROTATION_DEG, MAX_SHIFT_FRACTION = 12.0, 0.04
NOISE_STD, TEXTURE_STD, BIAS_STRENGTH, INTENSITY_SCALE = 0.02, 0.04, 0.25, 1000.0


def write_synthetic_fetal(
    root: Path,
    n_cases: int,
    shape: tuple[int, int, int] = (40, 40, 24),
    spacing: tuple[float, float, float] = (1.6, 1.6, 2.4),
    seed: int = 0,
) -> list[str]:
    """Write ``n_cases`` cases under ``root`` (images/, landmarks/) and return their case ids.

    ``shape`` and ``spacing`` are in RAS axis order; cases stored in a permuted orientation have
    their on-disk axes permuted accordingly.
    """
    root = Path(root)
    case_ids = []
    for index in range(n_cases):
        rng = np.random.default_rng([seed, index])
        case_id = SYNTHETIC_CASE_ID.format(index=index)
        ras_affine = centred_ras_affine(shape, spacing)
        tissue, points = _paint_brain(shape, ras_affine, rng)
        image = _t2_image(tissue, rng)
        codes = SYNTHETIC_ORIENTATIONS[index % len(SYNTHETIC_ORIENTATIONS)]
        write_oriented_nifti(root / IMAGES_DIR / f"{case_id}.nii.gz", image, ras_affine, codes)
        system = SYNTHETIC_COORDINATE_SYSTEMS[index % len(SYNTHETIC_COORDINATE_SYSTEMS)]
        write_landmarks(root / POINTS_DIR / f"{case_id}{POINTS_SUFFIX}", points, system)
        case_ids.append(case_id)
    return case_ids


def _paint_brain(shape: tuple[int, ...], ras_affine: np.ndarray,
                 rng: np.random.Generator) -> tuple[np.ndarray, dict[str, list[float]]]:
    """Tissue codes on the RAS voxel grid, and the landmarks in RAS world mm."""
    field_of_view = np.asarray(shape) * np.diag(ras_affine)[:3]
    brain_semi = BRAIN_FRACTION * field_of_view.min() * np.asarray(BRAIN_PROPORTIONS) * rng.uniform(*BRAIN_SCALE, 3)
    rotation = Rotation.from_euler("xyz", rng.uniform(-MAX_ROTATION_DEG, MAX_ROTATION_DEG, 3), degrees=True)
    shift = rng.uniform(-MAX_SHIFT_FRACTION, MAX_SHIFT_FRACTION, 3) * field_of_view
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1)
    world = grid @ ras_affine[:3, :3].T + ras_affine[:3, 3]
    # Brain frame = rotation^-1 (world - shift); row vectors, so apply() of the inverse.
    local = rotation.inv().apply(world.reshape(-1, 3) - shift).reshape(*shape, 3)

    radius = _ellipsoid_radius(local, np.zeros(3), brain_semi) + 0.02 * smooth_field(shape, rng, 3.0)
    brain = radius < 1.0
    tissue = np.full(shape, BACKGROUND, dtype=np.uint8)
    tissue[brain] = CSF
    tissue[radius < PARENCHYMA_RADIUS] = PARENCHYMA
    ellipsoids = {}
    for name, (code, centre, semi) in STRUCTURES.items():
        centre = (np.asarray(centre) + rng.normal(0.0, STRUCTURE_SHIFT, 3)) * brain_semi
        semi = np.asarray(semi) * rng.uniform(*STRUCTURE_SCALE, 3) * brain_semi
        tissue[brain & (_ellipsoid_radius(local, centre, semi) < 1.0)] = code
        ellipsoids[name] = (centre, semi)
    points = {}
    for landmark, (name, axis, side) in LANDMARK_EXTREMES.items():
        centre, semi = ellipsoids[name]
        point = centre.copy()
        point[axis] += side * semi[axis]
        points[landmark] = [float(v) for v in rotation.apply(point) + shift]
    return tissue, {name: points[name] for name in LANDMARK_NAMES}


def _ellipsoid_radius(local: np.ndarray, centre: np.ndarray, semi: np.ndarray) -> np.ndarray:
    """Normalised ellipsoidal distance: 1 on the ellipsoid's surface, 0 at its centre."""
    return np.sqrt((((local - centre) / semi) ** 2).sum(axis=-1))


def _t2_image(tissue: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Contrast x texture x smooth bias field + noise, int16; exactly 0 outside the brain mask."""
    base = np.asarray(T2_INTENSITY)[tissue]
    texture = 1.0 + TEXTURE_STD * smooth_field(tissue.shape, rng, 2.0)
    bias = np.exp(BIAS_STRENGTH * smooth_field(tissue.shape, rng, max(tissue.shape) / 3) / 2)
    image = base * texture * bias + NOISE_STD * rng.standard_normal(tissue.shape)
    # Noise must not create zeros inside the brain (the mask is "nonzero") nor values outside it.
    image = np.where(tissue != BACKGROUND, np.maximum(image * INTENSITY_SCALE, 1.0), 0.0)
    return np.round(image).astype(np.int16)


