"""Landmarks <-> heatmaps: Gaussian training targets from world points, and points back from heatmaps.

Everything is in world coordinates (mm, the image's voxel -> world affine), so anisotropic and
oblique grids need no special case: a target is the Gaussian of the world distance to the
landmark, and a decoded peak is mapped through the same affine.

Encoding (hand-written): MONAI's ``GenerateHeatmap`` rounds each centre to the nearest voxel before
blurring, an error of up to half a voxel per axis baked into every target, and takes sigma in voxels;
here the Gaussian is evaluated at every voxel centre's world position, so the target's peak is the
landmark itself and sigma is in mm on any grid.

Decoding: the argmax voxel, refined per axis by a parabola through the log-heatmap at the argmax and
its two neighbours (the Taylor step of Zhang et al., "Distribution-Aware Coordinate Representation
for Human Pose Estimation", CVPR 2020). The log of a Gaussian is a quadratic, and for an orthonormal
direction matrix the world Gaussian is separable along the voxel axes, so the refinement recovers
the sub-voxel centre of a Gaussian peak exactly. Why not soft-argmax: a network trained with MSE
leaves a small non-zero background over the whole volume, and a global expectation is pulled toward
the volume centre by that mass in proportion to the volume's size; the argmax is not.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

# Heatmap values are clamped to this fraction of the peak before the log, so a zero or negative
# neighbour (network output) gives a finite, maximally one-sided parabola instead of -inf.
LOG_FLOOR = 1e-6


def voxel_to_world(affine: np.ndarray, voxels: np.ndarray) -> np.ndarray:
    """World (mm) coordinates [..., 3] of voxel coordinates [..., 3] under a 4x4 affine."""
    affine = np.asarray(affine, dtype=np.float64)
    return np.asarray(voxels, dtype=np.float64) @ affine[:3, :3].T + affine[:3, 3]


def world_to_voxel(affine: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Continuous voxel coordinates [..., 3] of world points [..., 3] (the inverse of ``voxel_to_world``)."""
    return voxel_to_world(np.linalg.inv(np.asarray(affine, dtype=np.float64)), points)


def gaussian_heatmaps(points_mm: np.ndarray, affine: np.ndarray, shape: Sequence[int], sigma_mm: float) -> torch.Tensor:
    """One Gaussian per landmark, float32 [K, *shape]: exp(-|x - p_k|^2 / (2 sigma^2)) at each voxel centre x.

    The peak value is 1 at the landmark itself, so a voxel's value tells its distance to it.
    """
    if sigma_mm <= 0:
        raise ValueError(f"heatmap sigma must be positive, got {sigma_mm} mm")
    points = np.asarray(points_mm, dtype=np.float64).reshape(-1, 3)
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1)
    world = torch.from_numpy(voxel_to_world(affine, grid.reshape(-1, 3)))
    # Direct differences, not the |x|^2 + |p|^2 - 2 x.p expansion cdist uses for many points: the
    # expansion loses the sub-voxel digits of distances between points ~100 mm from the origin.
    squared = torch.cdist(torch.from_numpy(points), world, compute_mode="donot_use_mm_for_euclid_dist").square()
    heatmaps = torch.exp(-squared / (2.0 * sigma_mm**2))
    return heatmaps.reshape(len(points), *shape).to(torch.float32)


def heatmap_peaks(heatmaps: torch.Tensor | np.ndarray) -> np.ndarray:
    """Sub-voxel peak [K, 3] (continuous voxel coordinates) of each channel of [K, *spatial] heatmaps."""
    values = torch.as_tensor(heatmaps).detach().to(device="cpu", dtype=torch.float64)
    if values.ndim != 4:
        raise ValueError(f"expected heatmaps [K, D, H, W], got shape {tuple(values.shape)}")
    shape = values.shape[1:]
    peaks = np.zeros((values.shape[0], 3))
    for channel, heatmap in enumerate(values):
        index = np.unravel_index(int(heatmap.argmax()), shape)
        peaks[channel] = [i + _parabola_offset(heatmap, index, axis) for axis, i in enumerate(index)]
    return peaks


def _parabola_offset(heatmap: torch.Tensor, index: tuple[int, ...], axis: int) -> float:
    """Vertex of the parabola through log h at index-1, index, index+1 along `axis`, in [-0.5, 0.5].

    0 at the border (one neighbour missing) or where the three values are not a maximum.
    """
    if index[axis] == 0 or index[axis] == heatmap.shape[axis] - 1:
        return 0.0
    peak = float(heatmap[index])
    if peak <= 0:
        return 0.0
    before, after = list(index), list(index)
    before[axis] -= 1
    after[axis] += 1
    logs = [np.log(max(float(heatmap[tuple(i)]), peak * LOG_FLOOR)) for i in (before, index, after)]
    curvature = logs[0] - 2.0 * logs[1] + logs[2]
    if curvature >= 0:
        return 0.0
    return float(np.clip(0.5 * (logs[0] - logs[2]) / curvature, -0.5, 0.5))


def decode_heatmaps(heatmaps: torch.Tensor | np.ndarray, affine: np.ndarray) -> np.ndarray:
    """World coordinates (mm) [K, 3] of the peaks of [K, *spatial] heatmaps on the grid of ``affine``."""
    return voxel_to_world(affine, heatmap_peaks(heatmaps))
