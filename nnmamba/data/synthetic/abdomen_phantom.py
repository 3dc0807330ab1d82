"""Synthetic abdomens: the 15 AMOS organs painted into a body, imaged as CT (Hounsfield units) or MR.

Why: the AMOS and nnU-Net readers, the fingerprint/plan and the organ metrics must run end to end
without licensed data, on what real abdominal scans exercise: anisotropic spacing that varies per
case, CT intensities in HU (air -1000, fat -100, contrast-enhanced organs 100-250, bone 650) that
need dataset-level clipping, MR intensities in arbitrary units with a bias field that need per-image
z-scoring, large organs (liver) next to tiny ones (adrenal glands), and non-RAS orientations.

Geometry is written in millimetres, RAS (+x towards the patient's right, +y anterior, +z
superior), as fractions of the body's semi-axes, so one table serves any field of view and
spacing. Every case draws jittered organ centres and sizes, smooth boundary noise, texture, noise
and (MR) a bias field from its own RNG.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torchio as tio

from nnmamba.data.synthetic.orientation import centred_ras_affine, reorient_from_ras
from nnmamba.data.synthetic.brats import smooth_field

# AMOS 2022 label values and names (its dataset.json).
AMOS_LABELS: dict[int, str] = {
    0: "background", 1: "spleen", 2: "right kidney", 3: "left kidney", 4: "gall bladder", 5: "esophagus",
    6: "liver", 7: "stomach", 8: "aorta", 9: "postcava", 10: "pancreas", 11: "right adrenal gland",
    12: "left adrenal gland", 13: "duodenum", 14: "bladder", 15: "prostate/uterus",
}
# Tissue codes beyond the organs (organ code = its AMOS label).
AIR, FAT, MUSCLE, CAVITY, BONE = 0, 16, 17, 18, 19


@dataclass(frozen=True)
class Organ:
    """An ellipsoid (or a z-aligned elliptic cylinder) in body-relative coordinates.

    ``centre`` and ``semi`` are fractions of the body semi-axes (x, y) and of half the
    field of view along z; ``ct`` is the mean HU, ``mr`` the mean MR signal.
    """

    label: int
    centre: tuple[float, float, float]
    semi: tuple[float, float, float]
    ct: float
    mr: float
    cylinder: bool = False


# Painted in this order, so small organs painted last keep their voxels where shapes touch.
ORGANS: tuple[Organ, ...] = (
    Organ(6, (0.35, 0.05, 0.55), (0.45, 0.55, 0.40), ct=105, mr=420),    # liver
    Organ(7, (-0.30, 0.25, 0.55), (0.22, 0.20, 0.22), ct=35, mr=220),    # stomach
    Organ(1, (-0.55, -0.25, 0.45), (0.15, 0.22, 0.25), ct=120, mr=320),  # spleen
    Organ(2, (0.42, -0.45, 0.05), (0.13, 0.17, 0.30), ct=180, mr=360),   # right kidney
    Organ(3, (-0.42, -0.45, 0.10), (0.13, 0.17, 0.30), ct=180, mr=360),  # left kidney
    Organ(14, (0.0, 0.30, -0.80), (0.20, 0.22, 0.16), ct=8, mr=90),      # bladder
    Organ(15, (0.0, -0.05, -0.88), (0.10, 0.10, 0.10), ct=70, mr=270),   # prostate/uterus
    Organ(10, (-0.05, 0.02, 0.05), (0.35, 0.08, 0.08), ct=85, mr=300),   # pancreas
    Organ(13, (0.22, 0.05, -0.05), (0.10, 0.10, 0.16), ct=50, mr=240),   # duodenum
    Organ(4, (0.35, 0.28, 0.15), (0.08, 0.10, 0.14), ct=15, mr=120),     # gall bladder
    Organ(8, (-0.06, -0.28, 0.0), (0.06, 0.07, 1.0), ct=250, mr=180, cylinder=True),  # aorta
    Organ(9, (0.12, -0.22, 0.1), (0.06, 0.07, 0.8), ct=165, mr=200, cylinder=True),   # postcava
    Organ(5, (-0.05, -0.15, 0.85), (0.06, 0.07, 0.15), ct=45, mr=260, cylinder=True), # esophagus
    Organ(11, (0.25, -0.38, 0.42), (0.06, 0.07, 0.10), ct=60, mr=280),   # right adrenal gland
    Organ(12, (-0.25, -0.38, 0.45), (0.06, 0.07, 0.10), ct=60, mr=280),  # left adrenal gland
)
# Body: semi-axes as fractions of the field of view; fat and muscle layers in mm.
BODY_FRACTION = (0.45, 0.40)
FAT_MM, MUSCLE_MM = 6.0, 5.0
SPINE = Organ(BONE, (0.0, -0.68, 0.0), (0.12, 0.14, 1.0), ct=650, mr=150, cylinder=True)
TISSUE_CT = {AIR: -1000.0, FAT: -100.0, MUSCLE: 45.0, CAVITY: -30.0, BONE: 650.0}
TISSUE_MR = {AIR: 0.0, FAT: 750.0, MUSCLE: 250.0, CAVITY: 450.0, BONE: 150.0}
CT_NOISE_HU, CT_TEXTURE_HU = 12.0, 8.0
MR_NOISE, MR_TEXTURE, MR_BIAS = 15.0, 0.05, 0.35


def paint_abdomen(shape: tuple[int, int, int], spacing: tuple[float, float, float],
                  rng: np.random.Generator) -> np.ndarray:
    """Integer tissue map of one abdomen (organ codes = AMOS labels), RAS voxel order."""
    mm = np.meshgrid(*[(np.arange(n) - (n - 1) / 2) * s for n, s in zip(shape, spacing)], indexing="ij")
    extent = np.asarray(shape) * np.asarray(spacing)
    body = np.array([BODY_FRACTION[0] * extent[0], BODY_FRACTION[1] * extent[1], extent[2] / 2])
    body *= np.array([*rng.uniform(0.93, 1.05, 2), 1.0])
    outline = np.sqrt((mm[0] / body[0]) ** 2 + (mm[1] / body[1]) ** 2) + 0.02 * smooth_field(shape, rng, 3.0)
    tissue = np.full(shape, AIR, dtype=np.uint8)
    tissue[outline < 1.0] = FAT
    tissue[outline < 1.0 - FAT_MM / body[:2].min()] = MUSCLE
    cavity = outline < 1.0 - (FAT_MM + MUSCLE_MM) / body[:2].min()
    tissue[cavity] = CAVITY
    tissue[_organ_mask(SPINE, mm, body, rng, jitter=0.0)] = BONE
    for organ in ORGANS:
        tissue[cavity & _organ_mask(organ, mm, body, rng, jitter=0.05)] = organ.label
    return tissue


def _organ_mask(organ: Organ, mm: list[np.ndarray], body: np.ndarray, rng: np.random.Generator,
                jitter: float) -> np.ndarray:
    centre = (np.asarray(organ.centre) + rng.uniform(-jitter, jitter, 3)) * body
    semi = np.asarray(organ.semi) * body * rng.uniform(1 - 3 * jitter, 1 + 3 * jitter, 3)
    axes = (0, 1) if organ.cylinder else (0, 1, 2)
    radius = np.sqrt(sum(((mm[a] - centre[a]) / semi[a]) ** 2 for a in axes))
    inside = radius + 0.08 * smooth_field(radius.shape, rng, 2.0) < 1.0
    if organ.cylinder:
        inside &= np.abs(mm[2] - centre[2]) < semi[2]
    return inside


def organ_labels(tissue: np.ndarray) -> np.ndarray:
    """AMOS label map (uint8) of a tissue map: organ codes kept, everything else 0."""
    return np.where((tissue >= 1) & (tissue <= 15), tissue, 0).astype(np.uint8)


def ct_intensities(tissue: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """CT in Hounsfield units (int16): tissue HU + smooth texture + noise."""
    table = np.array([TISSUE_CT.get(code, 0.0) for code in range(BONE + 1)])
    for organ in ORGANS:
        table[organ.label] = organ.ct
    image = table[tissue] + CT_TEXTURE_HU * smooth_field(tissue.shape, rng, 1.5)
    image += CT_NOISE_HU * rng.standard_normal(tissue.shape)
    return np.clip(np.round(image), -1024, 3071).astype(np.int16)


def mr_intensities(tissue: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """MR-like signal (float32, >= 0): tissue signal x texture x smooth bias field, Rician-like noise."""
    table = np.array([TISSUE_MR.get(code, 0.0) for code in range(BONE + 1)])
    for organ in ORGANS:
        table[organ.label] = organ.mr
    grid = np.meshgrid(*[np.linspace(-1.0, 1.0, n) for n in tissue.shape], indexing="ij")
    bias = np.exp(MR_BIAS * sum(c * g for c, g in zip(rng.uniform(-1, 1, 3), grid)))
    signal = table[tissue] * (1.0 + MR_TEXTURE * smooth_field(tissue.shape, rng, 1.5)) * bias
    real = signal + MR_NOISE * rng.standard_normal(tissue.shape)
    noisy = np.hypot(real, MR_NOISE * rng.standard_normal(tissue.shape))
    return noisy.astype(np.float32)


def save_oriented(path: Path, ras_volume: np.ndarray, spacing: tuple[float, ...], codes: tuple[str, str, str],
                  label: bool) -> None:
    """Write a RAS-ordered volume stored in orientation ``codes`` (e.g. LPS), centred on the origin.

    The format follows the suffix (.nii.gz, .nrrd, .mha, ...; torchio/SimpleITK), the
    dtype is kept, so integer labels stay integer.
    """
    data, affine = reorient_from_ras(ras_volume, centred_ras_affine(ras_volume.shape, spacing), codes)
    image_type = tio.LabelMap if label else tio.ScalarImage
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    image_type(tensor=torch.from_numpy(data)[None], affine=affine).save(path)
