"""Segmentation training patches cut from memory-mapped cases and augmented one patch at a time.

Per case visit (one loader item), ``samples_per_volume`` patches; for each:

1. a voxel is drawn by label: a label's ``label_probabilities`` weight is shared by its
   voxels and labels absent from the case drop out (torchio ``LabelSampler``'s rule), in O(1)
   from the case's voxels sorted by label (:mod:`nnmamba.data.loading.unpacked`);
2. the patch is placed around it as :class:`~nnmamba.data.loading.sampling.ContainingLabelSampler`
   does, in the case zero-padded to at least the patch size as torchio's ``CropOrPad`` pads;
3. with probability ``affine_p`` the patch is resampled through a random rotation and scaling
   about its centre (torchio ``RandomAffine``'s parameter ranges and draws; trilinear image,
   nearest label, zero outside the case), else it is a plain crop;
4. the rest of the ``Augmentation`` (flips, gamma, noise) runs as torchio transforms on the patch.

Why not torchio's own sampler and RandomAffine (used before, and still for landmark heatmaps):
they augment the whole decompressed volume before drawing patches, which on the 16-core GPU
host fed 10.4 BraTS batches/s (a benchmark that overstated it) against the 41 a 36 ms train
step needs (benchmarks/results/h200_v3/loader_breakdown.json: where the time went); this way,
46 (benchmarks/results/h200_v4/loader_speed.json). torchio resamples only whole images, so the
patch-sized resampling of step 3 is written here, with torch's ``grid_sample``; nnU-Net's
augmentation also works patch by patch. A rotated patch is placed as in step 2 and then turned
about its centre, so near the border it can lose the drawn voxel.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torchio as tio
from torch.nn import functional as F
from torch.utils.data import Dataset

from nnmamba.data.loading.augmentation import Augmentation, augmentation_transform
from nnmamba.data.errors import DataError
from nnmamba.data.loading.unpacked import UnpackedCase, unpack_case


class ArrayPatchDataset(Dataset):
    """Item ``i``: the drawn, augmented patches of case ``i`` as torchio subjects (``image``, ``label``,
    ``location``: start and stop voxel in the padded case, before any rotation, and ``case_id``).

    ``cases`` are (case id, image file, label file). Of the ``augmentation``'s transforms
    (``augmentation_transform``), a RandomAffine only supplies its parameter draws and its
    probability to :func:`resample_patch`, and a RandomFlip its axes and probability to the crop,
    which reads the flipped patch in the same pass (torchio would copy it once more); the others
    run on each patch, in place (each patch is a new subject). Labels keep the unpacked copy's
    compact type. Cases are unpacked on first use, in whichever loader worker visits them first;
    each worker checks a case's copy once (its stamp against the source files), not on every visit.
    """

    def __init__(self, cases: list[tuple[str, Path, Path]], unpacked_dir: Path, patch_size: tuple[int, int, int],
                 samples_per_volume: int, label_probabilities: dict[int, float] | None, augmentation: Augmentation):
        self.cases, self.unpacked_dir = cases, Path(unpacked_dir)
        self.unpacked: dict[int, UnpackedCase] = {}
        self.patch_size = np.asarray(patch_size)
        self.samples_per_volume = samples_per_volume
        self.label_probabilities = label_probabilities
        transforms = augmentation_transform(augmentation, copy=False).transforms
        self.affine = _first_of(transforms, tio.RandomAffine)
        self.flip = _first_of(transforms, tio.RandomFlip)
        if self.flip is not None and not all(isinstance(axis, int) for axis in self.flip.axes):
            raise ValueError(f"patch flips take axis indices, got flip_axes {self.flip.axes}")
        self.patch_transform = tio.Compose(
            [t for t in transforms if not isinstance(t, (tio.RandomAffine, tio.RandomFlip))], copy=False)

    def __len__(self) -> int:
        return len(self.cases)

    def __getitem__(self, index: int) -> list[tio.Subject]:
        if index not in self.unpacked:
            self.unpacked[index] = unpack_case(*self.cases[index], self.unpacked_dir)
        case = self.unpacked[index]
        image = np.load(case.image, mmap_mode="c")  # writable mapping, for torch views; never written
        label = np.load(case.label, mmap_mode="r")
        voxels = draw_voxels(case, np.load(case.voxels_by_label, mmap_mode="r"), self.label_probabilities,
                             self.samples_per_volume)
        return [self.patch_transform(self._patch(case, image, label, voxel)) for voxel in voxels]

    def _patch(self, case: UnpackedCase, image: np.ndarray, label: np.ndarray, voxel: np.ndarray) -> tio.Subject:
        shape = np.asarray(case.shape)
        padded = np.maximum(shape, self.patch_size)
        pad_before = np.ceil((padded - shape) / 2).astype(int)  # torchio CropOrPad's split
        start = np.clip(voxel + pad_before - self.patch_size // 2, 0, padded - self.patch_size)
        origin = start - pad_before  # the patch's first voxel in the case's own coordinates
        flipped = self._flipped_axes()
        if self.affine is not None and torch.rand(1).item() < self.affine.probability:
            # About the patch centre, flipping output axis a is negating column a of the map.
            matrix = affine_matrix(self.affine, case.spacing) @ np.diag([-1 if a in flipped else 1 for a in range(3)])
            image_patch, label_patch = resample_patch(image, label, origin, self.patch_size, matrix)
        else:
            stop = origin + self.patch_size
            image_patch = torch.from_numpy(read_region(image, origin, stop, flipped))
            label_patch = torch.from_numpy(read_region(label, origin, stop, flipped))
        location = torch.as_tensor(np.concatenate([start, start + self.patch_size]))
        return tio.Subject(image=tio.ScalarImage(tensor=image_patch), label=tio.LabelMap(tensor=label_patch),
                           case_id=case.case_id, **{tio.LOCATION: location})

    def _flipped_axes(self) -> tuple[int, ...]:
        """torchio RandomFlip's draw: each of its axes flipped with its probability."""
        if self.flip is None:
            return ()
        hot = torch.rand(3) < self.flip.flip_probability
        return tuple(axis for axis in self.flip.axes if hot[axis])


def _first_of(transforms: list[tio.Transform], kind: type[tio.Transform]) -> tio.Transform | None:
    return next((t for t in transforms if isinstance(t, kind)), None)


def draw_voxels(case: UnpackedCase, voxels_by_label: np.ndarray, label_probabilities: dict[int, float] | None,
                count: int) -> np.ndarray:
    """``count`` voxel coordinates [count, 3]: a label drawn by its weight, then one of its voxels uniformly.

    ``None``: every nonzero voxel equally likely (torchio's LabelSampler without probabilities).
    """
    counts = np.asarray(case.label_counts)
    starts = case.label_starts
    if label_probabilities is None:
        first, total = int(counts[0]), int(counts.sum())
        if total == first:
            raise DataError(f"case {case.case_id}: no nonzero label voxel to draw a patch around")
        flat = voxels_by_label[first + torch.randint(total - first, (count,)).numpy()]
    else:
        labels = [k for k, p in label_probabilities.items() if p > 0 and 0 <= k < len(counts) and counts[k] > 0]
        if not labels:
            raise DataError(f"case {case.case_id}: none of the labels weighted in {label_probabilities} "
                            f"is present (voxels per label: {counts.tolist()})")
        weights = torch.tensor([float(label_probabilities[k]) for k in labels])
        chosen = np.asarray(labels)[torch.multinomial(weights, count, replacement=True).numpy()]
        offsets = (torch.rand(count, dtype=torch.float64).numpy() * counts[chosen]).astype(np.int64)
        flat = voxels_by_label[starts[chosen] + np.minimum(offsets, counts[chosen] - 1)]
    return np.stack(np.unravel_index(np.asarray(flat, dtype=np.int64), case.shape), axis=1)


def read_region(array: np.ndarray, start: np.ndarray, stop: np.ndarray,
                flipped_axes: tuple[int, ...] = ()) -> np.ndarray:
    """``array[:, start:stop]`` (all channels) with zeros where the box leaves the volume and the
    spatial ``flipped_axes`` reversed: one copy when the box lies inside."""
    shape = np.asarray(array.shape[1:])
    inner_start, inner_stop = np.clip(start, 0, shape), np.clip(stop, 0, shape)
    inside = tuple(slice(a, b) for a, b in zip(inner_start, inner_stop))
    reverse = (slice(None), *(slice(None, None, -1) if axis in flipped_axes else slice(None) for axis in range(3)))
    if (inner_start == start).all() and (inner_stop == stop).all():
        return np.array(array[(slice(None), *inside)][reverse])
    region = np.zeros((array.shape[0], *(stop - start)), dtype=array.dtype)
    if (inner_stop > inner_start).all():
        target = tuple(slice(a - s, b - s) for a, b, s in zip(inner_start, inner_stop, start))
        region[(slice(None), *target)] = array[(slice(None), *inside)]
    return np.ascontiguousarray(region[reverse])


def affine_matrix(affine: tio.RandomAffine, spacing: tuple[float, float, float]) -> np.ndarray:
    """A random rotation and scaling drawn as torchio's RandomAffine draws them, as a 3x3 map of voxel offsets.

    It acts in millimetres, so anisotropic voxels rotate like the anatomy: an output offset ``d``
    (mm) reads the input at ``R (d / s)``; scales above 1 zoom in, as in torchio.
    """
    scales, degrees, _ = affine.get_params(affine.scales, affine.degrees, affine.translation, affine.isotropic)
    rotation = rotation_matrix(degrees.numpy())
    millimetres = np.diag(np.asarray(spacing, dtype=np.float64))
    return np.linalg.inv(millimetres) @ rotation @ np.diag(1 / scales.numpy()) @ millimetres


def rotation_matrix(degrees: np.ndarray) -> np.ndarray:
    """Rotation by ``degrees[i]`` about axis i, about the first axis first."""
    matrix = np.eye(3)
    for axis, angle in enumerate(np.deg2rad(degrees)):
        i, j = (axis + 1) % 3, (axis + 2) % 3  # right-handed: x turns y to z, y turns z to x, z turns x to y
        turn = np.eye(3)
        turn[i, i] = turn[j, j] = np.cos(angle)
        turn[i, j], turn[j, i] = -np.sin(angle), np.sin(angle)
        matrix = turn @ matrix
    return matrix


def resample_patch(image: np.ndarray, label: np.ndarray, origin: np.ndarray, patch_size: np.ndarray,
                   matrix: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """The patch at ``origin`` resampled through ``matrix`` about its centre, zero outside the case.

    Only the part of the case the patch reaches is read: the image in place (``grid_sample`` on a
    view of the memory map, which must be mapped writable, mode "c", for torch to take it;
    nothing is written), the label as a float copy of that part.
    """
    centre = origin + (patch_size - 1) / 2
    corners = np.stack(np.meshgrid(*[[0, p - 1] for p in patch_size], indexing="ij"), -1).reshape(-1, 3)
    reached = centre + (corners - (patch_size - 1) / 2) @ matrix.T
    shape = np.asarray(image.shape[1:])
    # Clipped to the case: grid_sample's zero padding then stands for the zeros outside it.
    low = np.clip(np.floor(reached.min(0)).astype(int), 0, shape - 2)
    high = np.clip(np.floor(reached.max(0)).astype(int) + 2, low + 2, shape)
    region = (slice(None), *(slice(a, b) for a, b in zip(low, high)))
    grid = _sampling_grid(centre - low, high - low, patch_size, matrix)
    image_region = torch.from_numpy(image[region])[None]
    label_region = torch.from_numpy(label[region].astype(np.float32))[None]
    image_patch = F.grid_sample(image_region, grid, mode="bilinear", padding_mode="zeros", align_corners=True)[0]
    label_patch = F.grid_sample(label_region, grid, mode="nearest", padding_mode="zeros", align_corners=True)[0]
    return image_patch, torch.from_numpy(label_patch.numpy().astype(label.dtype))


def _sampling_grid(centre: np.ndarray, region_shape: np.ndarray, patch_size: np.ndarray,
                   matrix: np.ndarray) -> torch.Tensor:
    """grid_sample's [1, *patch_size, 3] grid: each output voxel's place in the region, (-1, 1) spanning its
    first to last voxel, listed (z, y, x). Summed from the three axes' offsets by broadcasting, which is
    cheaper than a meshgrid times the matrix."""
    offsets = [torch.arange(p, dtype=torch.float32) - (p - 1) / 2 for p in patch_size]
    along = [offsets[0].view(-1, 1, 1), offsets[1].view(1, -1, 1), offsets[2].view(1, 1, -1)]
    scale = 2 / (region_shape - 1)
    axes = [float(centre[i] * scale[i] - 1) + sum(float(matrix[i, j] * scale[i]) * along[j] for j in range(3))
            for i in (2, 1, 0)]
    return torch.stack(axes, dim=-1)[None]
