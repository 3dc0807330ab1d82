"""Uncompressed, memory-mapped copies of prepared cases, so training reads only the voxels of its patches.

Prepared cases are compressed NIfTI (the shared, DVC-tracked format). Decompressing a
BraTS-size case costs ~1.7 s, and the patch loader visits every case hundreds of times, so
each case is unpacked once into ``.npy`` arrays that are memory-mapped from then on
(nnU-Net's ``unpack_dataset`` does the same). Alongside the arrays goes the case's voxel
order sorted by label, from which a voxel of a given label is drawn in O(1)
(:mod:`nnmamba.data.loading.array_patches`).

The copies live outside the dataset directory (it is a DVC output): under
``$NNMAMBA_UNPACKED_DIR``, else ``$XDG_CACHE_HOME/nnmamba/unpacked`` (``~/.cache/...``). A copy
is keyed by its source files' path and rebuilt when their size or modification time changes.
Writes are atomic, so loader workers or trials unpacking the same case at once are safe.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torchio as tio

from nnmamba.data.errors import DataError
from nnmamba.data.preprocessing.preprocess import check_finite, read_image

FORMAT_VERSION = 1
STAMP = "stamp.json"


@dataclass(frozen=True)
class UnpackedCase:
    """One case's arrays: ``image`` float32 [C, X, Y, Z], ``label`` [1, X, Y, Z] (uint8, or int32 beyond 255),
    ``voxels_by_label`` (flat voxel indices ordered by label; label k's voxels start at
    ``label_starts[k]`` and number ``label_counts[k]``) and the voxel ``spacing`` in mm."""

    case_id: str
    image: Path
    label: Path
    voxels_by_label: Path
    shape: tuple[int, int, int]
    label_counts: tuple[int, ...]
    spacing: tuple[float, float, float]

    @property
    def label_starts(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum(self.label_counts)[:-1]]).astype(np.int64)


def default_unpacked_dir() -> Path:
    """``$NNMAMBA_UNPACKED_DIR``, else the user's cache directory (XDG)."""
    if "NNMAMBA_UNPACKED_DIR" in os.environ:
        return Path(os.environ["NNMAMBA_UNPACKED_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "nnmamba" / "unpacked"


def unpack_case(case_id: str, image_path: Path, label_path: Path, unpacked_dir: Path) -> UnpackedCase:
    """The case's unpacked copy, written first if missing or older than its source files."""
    image_path, label_path = Path(image_path).resolve(), Path(label_path).resolve()
    directory = Path(unpacked_dir) / hashlib.sha1(f"{image_path}\n{label_path}".encode()).hexdigest()[:20]
    sources = {"image": _file_identity(case_id, image_path), "label": _file_identity(case_id, label_path)}
    stamp = _read_stamp(directory)
    if stamp is None or stamp["sources"] != sources or stamp["version"] != FORMAT_VERSION:
        stamp = _write_arrays(case_id, image_path, label_path, directory, sources)
    return UnpackedCase(case_id, directory / "image.npy", directory / "label.npy", directory / "voxels_by_label.npy",
                        tuple(stamp["shape"]), tuple(stamp["label_counts"]), tuple(stamp["spacing"]))


def _file_identity(case_id: str, path: Path) -> dict:
    try:
        status = path.stat()
    except OSError as error:
        raise DataError(f"case {case_id}: cannot read {path}: {error}") from error
    return {"path": str(path), "size": status.st_size, "mtime_ns": status.st_mtime_ns}


def _read_stamp(directory: Path) -> dict | None:
    try:
        return json.loads((directory / STAMP).read_text())
    except (OSError, ValueError):
        return None


def _write_arrays(case_id: str, image_path: Path, label_path: Path, directory: Path, sources: dict) -> dict:
    """Decompress both files, check they agree, and write the arrays, then the stamp, each atomically."""
    image = check_finite(case_id, image_path, read_image(case_id, image_path, tio.ScalarImage))
    label = check_finite(case_id, label_path, read_image(case_id, label_path, tio.LabelMap))
    if label.num_channels != 1 or label.spatial_shape != image.spatial_shape:
        raise DataError(f"case {case_id}: label {label_path} has shape {tuple(label.shape)}, expected "
                        f"(1, {', '.join(map(str, image.spatial_shape))}) like {image_path}")
    codes = label.data.numpy()
    if codes.min() < 0:
        raise DataError(f"case {case_id}: label {label_path} has negative values")
    codes = codes.astype(np.uint8 if codes.max() < 256 else np.int32, copy=False)
    flat = codes.ravel()
    # numpy's stable sort of small integer types is a radix sort: one pass over the volume.
    voxels_by_label = np.argsort(flat, kind="stable").astype(np.min_scalar_type(flat.size - 1))
    directory.mkdir(parents=True, exist_ok=True)
    for name, array in (("image.npy", image.data.numpy().astype(np.float32, copy=False)), ("label.npy", codes),
                        ("voxels_by_label.npy", voxels_by_label)):
        _write_atomically(directory / name, partial(np.save, arr=array))
    stamp = {"version": FORMAT_VERSION, "case_id": case_id, "sources": sources, "shape": list(image.spatial_shape),
             "label_counts": np.bincount(flat).tolist(), "spacing": [float(s) for s in image.spacing]}
    _write_atomically(directory / STAMP, lambda path: path.write_text(json.dumps(stamp)))
    return stamp


def _write_atomically(path: Path, write: Callable[[Path], object]) -> None:
    """``write`` to a unique temporary name, then rename; a failed write (a full disk) leaves nothing behind."""
    temporary = path.with_name(f".{uuid.uuid4().hex}.{path.name}")  # keeps the suffix: np.save adds none
    try:
        write(temporary)
        os.replace(temporary, path)
    except OSError as error:
        temporary.unlink(missing_ok=True)
        raise OSError(f"cannot write the unpacked copy {path}: {error}") from error
