"""Writing synthetic RAS volumes in other on-disk orientations (LPS, PIR, ...), geometry unchanged.

The synthetic generators paint in RAS voxel order and store some cases in other axis orders, so the
readers' reorientation is exercised; these helpers keep the world geometry of every voxel fixed.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

RAS = ("R", "A", "S")


def centred_ras_affine(shape: tuple[int, ...], spacing: tuple[float, ...]) -> np.ndarray:
    """Voxel -> world (RAS, mm) affine of a grid of `spacing` whose centre is the world origin."""
    affine = np.diag([*map(float, spacing), 1.0])
    affine[:3, 3] = -(np.asarray(shape) - 1) / 2 * np.asarray(spacing)
    return affine


def reorient_from_ras(ras_volume: np.ndarray, ras_affine: np.ndarray,
                      codes: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
    """The volume's voxels in axis order `codes` and the affine that keeps each voxel's world position."""
    transform = nib.orientations.ornt_transform(nib.orientations.axcodes2ornt(RAS), nib.orientations.axcodes2ornt(codes))
    data = np.ascontiguousarray(nib.orientations.apply_orientation(ras_volume, transform))
    return data, ras_affine @ nib.orientations.inv_ornt_aff(transform, ras_volume.shape)


def write_oriented_nifti(path: Path, ras_volume: np.ndarray, ras_affine: np.ndarray, codes: tuple[str, ...]) -> None:
    """Store a RAS volume as NIfTI in orientation `codes`, dtype kept, qform and sform both set, units mm."""
    data, affine = reorient_from_ras(ras_volume, ras_affine, codes)
    image = nib.Nifti1Image(data, affine)
    image.header.set_xyzt_units("mm")
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    nib.save(image, path)
