"""Segment raw images with a trained model: the model's own preprocessing, sliding windows, raw geometry back.

(``predict_task`` predicts with a model of any task: landmark and classification models go to
``nnmamba.landmark_prediction`` and ``nnmamba.class_prediction``, with the same input cases.)

A model bundle's ``prediction.json`` (``nnmamba.checkpoint``) carries the plan the model was trained
with; a raw case is read and validated like in training, reoriented, normalised, cropped and
resampled exactly as its training data were, predicted with Gaussian-weighted sliding windows (and
optional mirror test-time augmentation), and mapped back onto the grid of its first channel file:
the written label file has the input's size, spacing, origin and direction.

Where preprocessing changed the spacing, the class PROBABILITIES are interpolated back (linear)
and the argmax is taken on the raw grid, as nnU-Net does; interpolating a label map instead would
erode thin structures twice. Otherwise the grids coincide voxel for voxel and the label map is
mapped back directly.

Inputs: a file, a folder of files, or a folder of case folders (BraTS). Multi-channel models read
nnU-Net names, ``<case>_0000<ending>``, ``<case>_0001<ending>``... in the model's channel order, or
files named by channel, ``<case>-<channel><ending>`` (BraTS's ``BraTS-GLI-00000-000-t1c.nii.gz``;
its ``-seg`` label files are skipped); a single-channel model also takes any image file as one case
(AMOS's ``amos_0507.nii.gz``). Outputs are named ``<case><ending>`` in the input's format.
"""

from __future__ import annotations

import errno
import io
import tempfile
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torchio as tio
from torch import nn
from tqdm import tqdm

from nnmamba.atomic import WriteError, staged
from nnmamba.class_prediction import classify_cases
from nnmamba.data.cases import CaseFiles
from nnmamba.data.errors import DataError
from nnmamba.data.intensity_ranges import warn_if_out_of_range
from nnmamba.data.readers.nnunet import (
    CHANNEL_FILE,
    channel_file,
    channel_images,
    group_by_case,
)
from nnmamba.data.preprocessing.plan import Preprocessing
from nnmamba.data.preprocessing.preprocess import load_case, preprocess_subject, to_raw_geometry
from nnmamba.inference import predict_labels, sliding_window_predict
from nnmamba.landmark_prediction import locate_cases

IMAGE_ENDINGS = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
MIRROR_AXES = (0, 1, 2)


def file_ending(path: Path) -> str | None:
    """The image format ending of a file name (``.nii.gz`` counts as one), None for non-images."""
    return next((ending for ending in IMAGE_ENDINGS if path.name.endswith(ending)), None)


def find_input_cases(path: Path, channels: Sequence[str]) -> list[CaseFiles]:
    """The cases in an input file or folder, each with one file per model channel (in channel order).

    Non-image files in a folder are ignored. Raises DataError for a missing input, no image
    file, a multi-channel case missing a channel file, or a file a multi-channel model cannot
    place.
    """
    path = Path(path)
    n_channels = len(channels)
    channel_of = partial(_parse, channels=tuple(channels))
    if path.is_file():
        if file_ending(path) is None:
            raise DataError(f"input {path} is not an image file ({', '.join(IMAGE_ENDINGS)})")
        case_id, _ = channel_of(path)
        candidates = [path] if n_channels == 1 else [
            p for p in _image_files(path.parent) if p.name.startswith((f"{case_id}_", f"{case_id}-"))]
        cases = {key: found for key, found in group_by_case(candidates, channel_of).items() if key == case_id}
    elif path.is_dir():
        cases = group_by_case(_image_files(path) or _case_folder_files(path), channel_of)
    else:
        raise DataError(f"input {path} does not exist")
    if not cases:
        raise DataError(f"input {path}: no image file ({', '.join(IMAGE_ENDINGS)}) to predict on")
    return [_complete_case(case_id, found, channels) for case_id, found in sorted(cases.items())]


# A BraTS case folder's label file, beside its channel files: not an input.
BRATS_LABEL_SUFFIX = "-seg"


def _image_files(folder: Path) -> list[Path]:
    files = (p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".") and file_ending(p))
    return sorted(p for p in files if not p.name[: -len(file_ending(p))].endswith(BRATS_LABEL_SUFFIX))


def _case_folder_files(folder: Path) -> list[Path]:
    """The image files one level down: a folder of case folders, as BraTS ships its cases."""
    return [file for sub in sorted(folder.iterdir()) if sub.is_dir() and not sub.name.startswith(".")
            for file in _image_files(sub)]


def _parse(path: Path, channels: tuple[str, ...]) -> tuple[str, int]:
    """(case id, channel index) of one file.

    ``<case>-<channel name>`` (BraTS) or ``<case>_XXXX`` (nnU-Net) names a channel of a case; a
    single-channel model also takes any other name as a whole case (AMOS's ``amos_0507`` is a
    case, not channel 507).
    """
    ending = file_ending(path) or ""
    stem = path.name[: -len(ending)]
    for index, name in enumerate(channels):
        if len(channels) > 1 and stem.endswith(f"-{name}") and len(stem) > len(name) + 1:
            return stem[: -len(name) - 1], index
    if len(channels) == 1:
        match = CHANNEL_FILE.match(stem)
        return (match["case"], 0) if match and int(match["channel"]) == 0 else (stem, 0)
    order = ", ".join(f"{index:04d} {name}" for index, name in enumerate(channels))
    return channel_file(path, ending, len(channels),
                        f"a {len(channels)}-channel model reads files named <case>_0000{ending}, <case>_0001... "
                        f"or <case>-<channel>{ending}, one per channel, in this order: {order}",
                        f"the model takes {len(channels)} channel(s): {order}")


def _complete_case(case_id: str, found: dict[int, Path], channels: Sequence[str]) -> CaseFiles:
    present = next(iter(found.values()))
    ending = file_ending(present)
    by_name = len(channels) > 1 and present.name[: -len(ending)].endswith(tuple(f"-{name}" for name in channels))
    images = channel_images(case_id, found, channels, present.parent, ending, by_name)
    return CaseFiles(case_id, images, None)


def segment_preprocessed(
    model: nn.Module,
    image: torch.Tensor,
    properties: dict,
    reference: Path | tio.Image,
    patch_size: Sequence[int],
    overlap: float = 0.5,
    mirror_axes: Sequence[int] = (),
    device: torch.device | str | None = None,
    amp_dtype: torch.dtype | None = None,
) -> tio.LabelMap:
    """Label map on the raw grid of ``reference`` from a preprocessed [C, *spatial] image (see module doc)."""
    window_options = {"overlap": overlap, "mirror_axes": mirror_axes, "device": device, "amp_dtype": amp_dtype}
    if properties.get("resampled"):
        return segment_with_probabilities(model, image, properties, reference, patch_size, **window_options)[0]
    back = to_raw_geometry(predict_labels(model, image, patch_size, **window_options)[0], properties, reference)
    return tio.LabelMap(tensor=_as_labels(back.data), affine=back.affine)


def segment_with_probabilities(
    model: nn.Module, image: torch.Tensor, properties: dict, reference: Path | tio.Image, patch_size: Sequence[int],
    **window_options,
) -> tuple[tio.LabelMap, tio.ScalarImage]:
    """The label map and the class probabilities [C, *raw grid] behind it, both on the raw grid of
    ``reference``: the probabilities are mapped back (linear) and the argmax taken there.

    Outside the crop box (and partly at its border) no window predicted anything; that missing
    probability is background's, so every voxel's probabilities sum to 1, as nnU-Net saves them."""
    probabilities = sliding_window_predict(model, image, patch_size, **window_options)[0]
    back = to_raw_geometry(probabilities, properties, reference)
    back.data[0] += (1 - back.data.sum(dim=0)).clamp(min=0)
    labels = tio.LabelMap(tensor=_as_labels(back.data.argmax(dim=0, keepdim=True)), affine=back.affine)
    return labels, back


def _as_labels(labels: torch.Tensor) -> torch.Tensor:
    """uint8 where the classes fit (every viewer reads it), int16 otherwise."""
    return labels.to(torch.uint8 if int(labels.max()) <= torch.iinfo(torch.uint8).max else torch.int16)


def predict_case(
    model: nn.Module,
    case: CaseFiles,
    record: dict,
    device: torch.device | str | None = None,
    mirror_axes: Sequence[int] = (),
    overlap: float | None = None,
    probabilities: bool = False,
) -> tuple[tio.LabelMap, tio.ScalarImage | None]:
    """Segment one raw case with the model's plan: the label map and (with `probabilities`) the class
    probabilities, on the grid of the case's first channel."""
    plan = record["plan"]
    subject = load_case(case, label_values=None)
    warn_if_out_of_range(case, subject["image"].data, record.get("intensity_ranges"))
    preprocessed, properties = preprocess_subject(subject, plan["crop_margin"], Preprocessing.from_plan(plan))
    # The loaded raw image lies on the first channel's grid: the resampling target, not read again.
    arguments = (model, preprocessed["image"].data, properties, subject["image"], record["patch_size"])
    options = {"overlap": record["overlap"] if overlap is None else overlap, "mirror_axes": mirror_axes,
               "device": device}
    if probabilities:
        return segment_with_probabilities(*arguments, **options)
    return segment_preprocessed(*arguments, **options), None


def predict_cases(
    model: nn.Module,
    record: dict,
    cases: Sequence[CaseFiles],
    output_dir: Path,
    device: torch.device | str | None = None,
    mirror_axes: Sequence[int] = (),
    overlap: float | None = None,
    progress: bool = True,
    save_probabilities: bool = False,
) -> list[Path]:
    """Segment every case into ``output_dir/<case><ending>``; a file appears only once fully written.

    With `save_probabilities`, also ``<case>.npz`` beside it (nnU-Net's `--save_probabilities`): the
    class probabilities as float16 ``probabilities`` [C, *spatial] on the label file's voxel grid
    (torchio's array order, as ``tio.LabelMap(file).numpy()[0]``), and the label names in ``labels``.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for case in tqdm(cases, desc="predict", unit="case", disable=not progress):
        labels, probabilities = predict_case(model, case, record, device, mirror_axes, overlap, save_probabilities)
        ending = file_ending(next(iter(case.images.values())))
        target = output_dir / f"{case.case_id}{ending}"
        save_label_map(labels, target)
        written.append(target)
        if probabilities is not None:
            written.append(save_probability_map(probabilities, record["labels"], output_dir / f"{case.case_id}.npz"))
    return written


def save_probability_map(probabilities: tio.ScalarImage, labels: dict[str, str], path: Path) -> Path:
    """`probabilities` and the label names in class order as one .npz, replaced atomically."""
    buffer = io.BytesIO()
    names = np.array([labels[str(index)] for index in range(probabilities.shape[0])])
    np.savez_compressed(buffer, probabilities=probabilities.numpy().astype(np.float16), labels=names)
    with staged() as staging:
        staging.file(path, buffer.getvalue())
    return path


def save_label_map(labels: tio.LabelMap, path: Path) -> None:
    """Replace `path` (and a two-file format's data file) with the label map, atomically (nnmamba.atomic).

    SimpleITK's NIfTI writer reports no error on a full disk: it leaves an empty or truncated file and
    returns. So the map is written to a scratch folder and read back whole first; its files' bytes
    then go to `path`'s folder through nnmamba.atomic, whose errors name the file and the OS reason.
    """
    path = Path(path)
    with tempfile.TemporaryDirectory(prefix="nnmamba-labels-") as scratch:
        labels.save(Path(scratch) / path.name)
        try:
            whole = np.array_equal(tio.LabelMap(Path(scratch) / path.name).numpy(), labels.numpy())
        except RuntimeError:   # SimpleITK cannot read an empty or truncated file
            whole = False
        if not whole:
            raise WriteError(path, OSError(errno.EIO, f"SimpleITK's output does not read back whole from {scratch} "
                                                      f"(is {tempfile.gettempdir()} full?)"))
        with staged() as staging:
            for file in sorted(Path(scratch).iterdir()):
                staging.file(path.parent / file.name, file.read_bytes())


def predict_task(model: nn.Module, record: dict, cases: Sequence[CaseFiles], output_dir: Path,
                 device: torch.device | str | None = None, tta: bool = False, overlap: float | None = None,
                 progress: bool = True, save_probabilities: bool = False) -> list[Path]:
    """Predict every case as the model's task does: label files (segmentation), ``<case>.json`` world
    points (landmark), one ``probabilities.csv`` (classification); see each predictor's module.

    Test-time mirroring uses the axes the model was evaluated with (a landmark model's record leaves
    out the axes that swap left and right landmarks), all three for bundles that name none.
    """
    task = record["task"]
    mirror_axes = tuple(record.get("mirror_axes", MIRROR_AXES)) if tta else ()
    if save_probabilities and task != "segmentation":
        raise DataError(f"--save-probabilities is for segmentation models; this is a {task} model"
                        + (" (its probabilities.csv holds them)" if task == "classification" else ""))
    if task == "segmentation":
        return predict_cases(model, record, cases, output_dir, device, mirror_axes, overlap, progress,
                             save_probabilities)
    if task == "landmark":
        return locate_cases(model, record, cases, output_dir, device, mirror_axes, overlap, progress)
    if task == "classification":
        return classify_cases(model, record, cases, output_dir, device, mirror_axes, progress)
    raise DataError(f"the model's prediction record names an unknown task {task!r}")
