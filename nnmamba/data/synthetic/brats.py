"""Synthetic BraTS-like cases, written as real NIfTI files in the BraTS 2023 layout.

Why: the pipeline must run end to end on a laptop or in CI without the licensed
BraTS data, and still exercise what real data exercises: gzip'd NIfTI reading,
mixed dtypes, non-RAS orientations (BraTS stores LPS-style affines), zero
background for the head mask, per-modality contrast for normalisation, and
nested tumour labels for the WT/TC/ET region metrics.

Each case is a head (scalp/skull shell, CSF, grey and white matter, two
ventricles) holding one tumour whose sub-regions nest like real gliomas:
edema (2) around an enhancing rim (3) around a necrotic core (1). Shapes are
ellipsoids perturbed by smooth noise; position, size, noise and bias field are
drawn from a per-case RNG seeded by ``(seed, case index)``, so a case does not
change when ``n_cases`` does.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import numpy as np
from scipy.ndimage import gaussian_filter

from nnmamba.data.parallel import map_cases
from nnmamba.data.readers.brats import BRATS_SEG, brats_file
from nnmamba.data.synthetic.orientation import centred_ras_affine, write_oriented_nifti

# Odd cases use the second orientation so canonical reorientation (flips AND an
# axis permutation) is exercised: LPS is what BraTS ships, PIR a sagittal-like one.
SYNTHETIC_ORIENTATIONS = (("L", "P", "S"), ("P", "I", "R"))
SYNTHETIC_CASE_ID = "BraTS-GLI-{index:05d}-000"

# Tissue codes of the painted head; tumour codes are painted last so they win.
BACKGROUND, SCALP, CSF, GREY, WHITE, VENTRICLE, EDEMA, ENHANCING, NECROSIS = range(9)
TUMOUR_LABEL = {EDEMA: 2, ENHANCING: 3, NECROSIS: 1}

# Relative intensity of each tissue code (index = code) per modality, ordered as
# real MRI contrast: t1c shows enhancing tumour bright, t2w/t2f (FLAIR) show
# edema bright, FLAIR suppresses CSF, t1n shows the tumour dark-ish.
TISSUE_INTENSITY = {
    "t1c": (0.0, 0.60, 0.20, 0.55, 0.75, 0.20, 0.45, 1.30, 0.30),
    "t1n": (0.0, 0.55, 0.20, 0.55, 0.75, 0.20, 0.42, 0.50, 0.30),
    "t2f": (0.0, 0.55, 0.15, 0.70, 0.55, 0.15, 1.25, 0.95, 0.60),
    "t2w": (0.0, 0.50, 1.30, 0.75, 0.55, 1.30, 1.10, 0.85, 1.20),
}
# int16 like most scanner exports for the T1s, float32 for the others: readers
# and preprocessing must handle both within one case.
MODALITY_DTYPE = {"t1c": np.int16, "t1n": np.int16, "t2f": np.float32, "t2w": np.float32}
INTENSITY_SCALE = 1000.0

# Head geometry as fractions: head semi-axis / field of view, then shell radii
# relative to the head surface.
HEAD_FRACTION = 0.42
SKULL_INNER, BRAIN_OUTER, WHITE_OUTER = 0.88, 0.82, 0.66
NOISE_STD, TEXTURE_STD, BIAS_STRENGTH = 0.02, 0.04, 0.25


def write_synthetic_brats(
    root: Path,
    n_cases: int,
    shape: tuple[int, int, int] = (64, 64, 48),
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0),
    seed: int = 0,
    workers: int = 1,
) -> list[str]:
    """Write ``n_cases`` cases under ``root`` and return their case ids.

    ``shape`` and ``spacing`` are given in RAS axis order; cases stored in a
    permuted orientation have their on-disk array axes permuted accordingly.
    ``workers`` processes write cases side by side (BraTS-size cases take seconds each);
    every case depends on its own index alone, so the files are the same for any count.
    """
    write = partial(_write_synthetic_case, Path(root), tuple(shape), tuple(spacing), seed)
    return map_cases(write, range(n_cases), workers, desc="synthesize")


def _write_synthetic_case(root: Path, shape: tuple[int, int, int], spacing: tuple[float, float, float], seed: int,
                          index: int) -> str:
    rng = np.random.default_rng([seed, index])
    case_id = SYNTHETIC_CASE_ID.format(index=index)
    tissue = _paint_head(shape, spacing, rng)
    volumes = {m: _modality_image(tissue, m, rng) for m in TISSUE_INTENSITY}
    volumes[BRATS_SEG] = _tumour_labels(tissue)
    codes = SYNTHETIC_ORIENTATIONS[index % len(SYNTHETIC_ORIENTATIONS)]
    _write_case(root / case_id, volumes, centred_ras_affine(shape, spacing), codes)
    return case_id


def smooth_field(shape: tuple[int, ...], rng: np.random.Generator, sigma: float) -> np.ndarray:
    """Zero-mean, unit-std smooth random field: the irregularity of every shape."""
    field = gaussian_filter(rng.standard_normal(shape), sigma)
    return (field - field.mean()) / field.std()


def paint_head_layers(shape: tuple[int, ...], spacing: tuple[float, ...], head_scale: np.ndarray,
                      rng: np.random.Generator, white_outer: float = WHITE_OUTER
                      ) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    """Scalp, CSF, grey and white matter (codes above) of an irregular ellipsoidal head, RAS voxel order.

    Returns the voxel centres in mm (centred grid), the tissue map and the brain's semi-axes
    (mm), where the callers place their own structures (tumour, ventricles, hippocampi).
    """
    mm = np.meshgrid(*[(np.arange(n) - (n - 1) / 2) * s for n, s in zip(shape, spacing)], indexing="ij")
    head_semi = HEAD_FRACTION * np.asarray(shape) * np.asarray(spacing) * head_scale
    radius = ellipsoid_radius(mm, np.zeros(3), head_semi) + 0.02 * smooth_field(shape, rng, 4.0)
    tissue = np.full(shape, BACKGROUND, dtype=np.uint8)
    tissue[radius < 1.0] = SCALP
    tissue[radius < SKULL_INNER] = CSF
    tissue[radius < BRAIN_OUTER] = GREY
    tissue[radius + 0.03 * smooth_field(shape, rng, 1.5) < white_outer] = WHITE
    return mm, tissue, BRAIN_OUTER * head_semi


def _paint_head(shape: tuple[int, ...], spacing: tuple[float, ...], rng: np.random.Generator) -> np.ndarray:
    """Integer tissue map (codes above) of one head with one tumour, RAS voxel order."""
    mm, tissue, brain_semi = paint_head_layers(shape, spacing, rng.uniform(0.95, 1.05, 3), rng)
    for side in (-1.0, 1.0):
        centre = brain_semi * np.array([0.14 * side, 0.05, 0.12])
        tissue[ellipsoid_radius(mm, centre, brain_semi * np.array([0.09, 0.28, 0.14])) < 1.0] = VENTRICLE
    _paint_tumour(tissue, mm, brain_semi, rng)
    return tissue


def ellipsoid_radius(mm: list[np.ndarray], centre: np.ndarray, semi: np.ndarray) -> np.ndarray:
    """Normalised ellipsoidal distance: 1 on the ellipsoid surface, 0 at its centre."""
    return np.sqrt(sum(((axis - c) / s) ** 2 for axis, c, s in zip(mm, centre, semi)))


def _paint_tumour(tissue: np.ndarray, mm: list[np.ndarray], brain_semi: np.ndarray, rng: np.random.Generator) -> None:
    """Paint edema ⊃ enhancing rim ⊃ necrotic core inside the brain, in place."""
    brain = np.isin(tissue, (GREY, WHITE, VENTRICLE))
    direction = rng.standard_normal(3)
    offset = brain_semi * direction / np.linalg.norm(direction) * 0.45 * rng.uniform() ** (1 / 3)
    # Snap the centre onto a voxel centre so the solid core kernel below always
    # contains at least that voxel: every case then has all three labels.
    centre = np.array([axis.flat[np.abs(axis - o).argmin()] for axis, o in zip(mm, offset)])
    semi = brain_semi.min() * rng.uniform(0.40, 0.60) * rng.uniform(0.8, 1.2, 3)
    radius = ellipsoid_radius(mm, centre, semi)
    rim_field = smooth_field(tissue.shape, rng, 2.0)
    edema = radius + 0.25 * smooth_field(tissue.shape, rng, 2.5) < 1.0
    rim = edema & (radius + 0.12 * rim_field < 0.70)
    core = rim & ((radius + 0.12 * rim_field < 0.45) | (radius < 0.12))
    tissue[brain & edema] = EDEMA
    tissue[brain & rim] = ENHANCING
    tissue[brain & core] = NECROSIS


def _tumour_labels(tissue: np.ndarray) -> np.ndarray:
    labels = np.zeros(tissue.shape, dtype=np.uint8)
    for code, label in TUMOUR_LABEL.items():
        labels[tissue == code] = label
    return labels


def _modality_image(tissue: np.ndarray, modality: str, rng: np.random.Generator) -> np.ndarray:
    """Contrast + texture + smooth multiplicative bias field + noise; exactly 0 outside the head."""
    base = np.asarray(TISSUE_INTENSITY[modality], dtype=np.float64)[tissue]
    texture = 1.0 + TEXTURE_STD * smooth_field(tissue.shape, rng, 2.0)
    grid = np.meshgrid(*[np.linspace(-1.0, 1.0, n) for n in tissue.shape], indexing="ij")
    linear = sum(c * g for c, g in zip(rng.uniform(-1, 1, 3), grid))
    quadratic = sum(c * g * g for c, g in zip(rng.uniform(-1, 1, 3), grid))
    bias = np.exp(BIAS_STRENGTH * (linear + quadratic) / 2)
    image = base * texture * bias + NOISE_STD * rng.standard_normal(tissue.shape)
    head = tissue != BACKGROUND
    # Noise must not create zeros inside the head (the head mask is "any channel
    # nonzero") nor values outside it (real skull-stripped-free scans are 0 there).
    image = np.where(head, np.maximum(image * INTENSITY_SCALE, 1.0), 0.0)
    dtype = MODALITY_DTYPE[modality]
    return np.round(image).astype(dtype) if np.issubdtype(dtype, np.integer) else image.astype(dtype)


def _write_case(case_dir: Path, volumes: dict[str, np.ndarray], ras_affine: np.ndarray, codes: tuple[str, ...]) -> None:
    """Store every RAS volume of one case in orientation ``codes`` (same world geometry)."""
    for name, ras_volume in volumes.items():
        write_oriented_nifti(brats_file(case_dir, name), ras_volume, ras_affine, codes)
