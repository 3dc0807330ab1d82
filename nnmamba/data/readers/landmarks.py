"""Reader and writer for the landmarks raw layout: a NIfTI volume plus one JSON of named world points per case.

::

    <root>/images/<case_id>.nii.gz
    <root>/landmarks/<case_id>.json   {"coordinate_system": "RAS", "unit": "mm",
                                       "landmarks": {"TCD1": [x, y, z], "TCD2": [...], ...}}

Points are world coordinates in mm. ``coordinate_system`` is "RAS" (NIfTI/NiBabel's convention, the
default when the key is absent) or "LPS" (ITK's, used by 3D Slicer markups and most DICOM tools);
LPS points are converted to RAS on reading, so everything downstream is RAS.

The default names are the paper's six fetal cerebellum landmarks (Table 4): the two ends of the
transverse cerebellar diameter (TCD1, TCD2), of the vermis height (HDV1 superior, HDV2 inferior)
and of the vermis antero-posterior diameter (ADV1 anterior, ADV2 posterior). A file may hold more
points than the study uses; a missing one is an error.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nnmamba.data.cases import CaseFiles
from nnmamba.data.errors import DataError
from nnmamba.data.readers.paths import check_inside_root

LANDMARK_NAMES = ("TCD1", "TCD2", "HDV1", "HDV2", "ADV1", "ADV2")
LANDMARK_CHANNELS = ("image",)
IMAGES_DIR, POINTS_DIR = "images", "landmarks"
IMAGE_SUFFIXES = (".nii.gz", ".nii")
POINTS_SUFFIX = ".json"
# World-axis signs that take a coordinate system's points to RAS.
TO_RAS = {"RAS": np.array([1.0, 1.0, 1.0]), "LPS": np.array([-1.0, -1.0, 1.0])}


@dataclass(frozen=True)
class LandmarkCaseFiles(CaseFiles):
    """The files of one landmark case: the image(s), no label map, and the points JSON."""

    points: Path

    def files(self) -> list[Path]:
        """The image(s) and the points JSON."""
        return [*super().files(), self.points]


def find_landmark_cases(root: Path) -> list[LandmarkCaseFiles]:
    """Every case under ``root`` (an image in images/ with its JSON in landmarks/), sorted by case id.

    Only the layout is checked here (which files exist, all inside ``root`` even through symlinks);
    the points are validated against their image by ``read_landmarks`` and ``check_inside`` when
    the case is prepared.
    """
    root = Path(root)
    images_dir = root / IMAGES_DIR
    if not images_dir.is_dir():
        raise DataError(f"landmarks root {root} has no {IMAGES_DIR}/ folder")
    images = sorted(p for p in images_dir.iterdir() if p.name.endswith(IMAGE_SUFFIXES) and not p.name.startswith("."))
    if not images:
        raise DataError(f"landmarks root {root}: {images_dir} contains no NIfTI images ({', '.join(IMAGE_SUFFIXES)})")
    cases = []
    for image in images:
        case_id = _case_id(image)
        points = root / POINTS_DIR / f"{case_id}{POINTS_SUFFIX}"
        if not points.is_file():
            raise DataError(f"case {case_id}: landmarks file missing, expected {points}")
        case = LandmarkCaseFiles(case_id=case_id, images={LANDMARK_CHANNELS[0]: image}, label=None, points=points)
        check_inside_root(case.files(), root, f"case {case_id}")
        cases.append(case)
    return cases


def _case_id(image: Path) -> str:
    return next(image.name.removesuffix(s) for s in IMAGE_SUFFIXES if image.name.endswith(s))


def read_landmarks(path: Path, names: Sequence[str], case_id: str) -> dict[str, list[float]]:
    """The named points of one case in RAS world mm, in the order of ``names``.

    Raises DataError naming the case and the file for unreadable JSON, an unknown coordinate system,
    a missing landmark (listing those present, so a misspelt name is obvious) or a malformed point.
    """
    try:
        content = json.loads(Path(path).read_text())
    except (OSError, ValueError) as error:
        raise DataError(f"case {case_id}: cannot read landmarks file {path}: {error}") from error
    if not isinstance(content, Mapping) or not isinstance(content.get("landmarks"), Mapping):
        raise DataError(f"case {case_id}: {path} has no 'landmarks' object of name -> [x, y, z]")
    system = content.get("coordinate_system", "RAS")
    if system not in TO_RAS:
        raise DataError(f"case {case_id}: {path} has coordinate_system {system!r}; known: {sorted(TO_RAS)}")
    found = content["landmarks"]
    missing = [name for name in names if name not in found]
    if missing:
        raise DataError(f"case {case_id}: {path} lacks landmark(s) {missing}; it has {sorted(found)}")
    points = {}
    for name in names:
        point = found[name]
        if not (isinstance(point, list) and len(point) == 3 and all(_is_finite_number(v) for v in point)):
            raise DataError(f"case {case_id}: {path}: landmark {name} is {point!r}, expected [x, y, z] in mm")
        points[name] = [float(v) for v in np.asarray(point, dtype=np.float64) * TO_RAS[system]]
    return points


def _is_finite_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_inside(case_id: str, points: Mapping[str, Sequence[float]], affine: np.ndarray, shape: Sequence[int],
                 where: str) -> None:
    """Raise DataError naming the case and the point if a world point lies outside a volume's field of view.

    The field of view is the voxels' extent: voxel centres 0..n-1 plus half a voxel on each side.
    """
    inverse = np.linalg.inv(np.asarray(affine, dtype=np.float64))
    for name, point in points.items():
        voxel = inverse[:3, :3] @ np.asarray(point, dtype=np.float64) + inverse[:3, 3]
        if np.any(voxel < -0.5) or np.any(voxel > np.asarray(shape) - 0.5):
            raise DataError(
                f"case {case_id}: landmark {name} at {[round(float(v), 2) for v in point]} mm (RAS) lies outside "
                f"{where} (voxel {np.round(voxel, 1).tolist()}, shape {list(shape)})"
            )


def write_landmarks(path: Path, points: Mapping[str, Sequence[float]], coordinate_system: str = "RAS") -> None:
    """Write RAS world points as a landmarks JSON in ``coordinate_system`` (the reader's inverse)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(landmarks_json(points, coordinate_system))


def landmarks_json(points: Mapping[str, Sequence[float]], coordinate_system: str = "RAS") -> str:
    """RAS world points as the text of a landmarks JSON in ``coordinate_system``."""
    if coordinate_system not in TO_RAS:
        raise ValueError(f"unknown coordinate system {coordinate_system!r}; known: {sorted(TO_RAS)}")
    converted = {name: [float(v) for v in np.asarray(p, dtype=np.float64) * TO_RAS[coordinate_system]]
                 for name, p in points.items()}
    payload = {"coordinate_system": coordinate_system, "unit": "mm", "landmarks": converted}
    return json.dumps(payload, indent=2) + "\n"
