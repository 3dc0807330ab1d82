"""Layout-agnostic loading, validation and preprocessing of cases (torchio throughout).

Works for any number of channels and any label set: a layout reader hands over
:class:`CaseFiles`, this module turns each into a canonical (RAS), per-channel
normalised, foreground-cropped and (where the plan says so) resampled subject, and
records the geometry needed to put a prediction back onto the raw image grid
(``to_raw_geometry``). What normalisation and which spacing come from a
:class:`~nnmamba.data.preprocessing.plan.Preprocessing`; without one, BraTS's head-mask z-score at
native spacing.
"""

from __future__ import annotations

import json
import warnings
from functools import partial
from collections.abc import Collection, Mapping
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torchio as tio

from nnmamba.atomic import staged_directory
from nnmamba.data.cases import CaseFiles
from nnmamba.data.errors import DataError
from nnmamba.data.intensity_ranges import dataset_ranges, image_ranges
from nnmamba.data.parallel import map_cases
from nnmamba.data.preprocessing.plan import ChannelNormalization, Preprocessing

# Two files of one case count as the same grid when their affines agree to this
# (mm for origins, unitless for direction*spacing): NIfTI stores qform
# quaternions in float32, so files written by different tools differ by ~1e-5.
GEOMETRY_TOLERANCE = 1e-3
MASK_KEY = "mask"
DATASET_JSON = "dataset.json"
IMAGE_SUFFIX = ".nii.gz"
NIFTI_SUFFIXES = (".nii", ".nii.gz")
# Labels live as uint8 in memory and on disk: small, and nibabel (which
# ToCanonical goes through) refuses int64 arrays.
LABEL_DTYPE = torch.uint8


def load_case(case: CaseFiles, label_values: Collection[int] | None) -> tio.Subject:
    """Read and validate one case into a subject with ``image`` (C channels) and ``label``.

    Channel order is the order of ``case.images``. ``label_values`` lists the
    allowed label values (``None`` allows any integer). Every image file must be
    finite and not constant (``check_finite``, ``_check_not_constant``).
    """
    if not case.images:
        raise DataError(f"case {case.case_id}: no image files given")
    channels = [_read_single_channel(case.case_id, path) for path in case.images.values()]
    reference_path = next(iter(case.images.values()))
    for path, image in zip(list(case.images.values())[1:], channels[1:]):
        _check_same_grid(case.case_id, reference_path, channels[0], path, image)
    affine = channels[0].affine
    stacked = torch.cat([image.data.to(torch.float32) for image in channels])
    subject = tio.Subject(
        image=tio.ScalarImage(tensor=stacked, affine=affine),
        case_id=case.case_id,
        channels=list(case.images),
    )
    if case.label is not None:
        label = _read_label(case.case_id, case.label, label_values)
        _check_same_grid(case.case_id, reference_path, channels[0], case.label, label)
        subject.add_image(tio.LabelMap(tensor=label.data, affine=affine), "label")
    return subject


def read_image_file(path: str | Path) -> tuple[torch.Tensor, np.ndarray]:
    """torchio reader returning ([C, W, H, D] tensor, RAS affine): NiBabel for NIfTI, SimpleITK otherwise.

    Why not torchio's default (SimpleITK) for NIfTI: its NIfTI library silently
    turns NaN/inf voxels into 0 and zero-fills a truncated .nii.gz, so neither
    fault could be detected; NiBabel keeps the NaNs and raises on truncation.
    """
    if not str(path).endswith(NIFTI_SUFFIXES):
        return tio.data.io.read_image(path)
    image = nib.load(str(path), mmap=False)
    data = np.asanyarray(image.dataobj)
    if data.ndim == 5 and data.shape[3] == 1:  # NIfTI vector: (W, H, D, 1, C)
        data = data[:, :, :, 0]
    if data.ndim == 3:
        data = data[np.newaxis]
    elif data.ndim == 4:
        data = data.transpose(3, 0, 1, 2)
    else:
        raise ValueError(f"expected a 3D image or a 4D one with channels last, got shape {data.shape}")
    return torch.as_tensor(tio.data.io.check_uint_to_int(np.ascontiguousarray(data))), image.affine


def read_image(case_id: str, path: Path, image_type: type[tio.Image]) -> tio.Image:
    """Load a file fully, turning any reader failure into one DataError."""
    with warnings.catch_warnings():
        # torchio warns before falling back from SimpleITK to NiBabel; the
        # DataError below already says the file could not be read.
        warnings.filterwarnings("ignore", message="Error loading image with SimpleITK")
        try:
            image = image_type(path, reader=read_image_file)
            image.load()
        # Readers fail in many types (RuntimeError, EOFError, zlib.error,
        # OSError, ImageFileError, ...) for a truncated or foreign file.
        except Exception as error:
            raise DataError(f"case {case_id}: cannot read {path}: {error}") from error
    return image


def check_finite(case_id: str, path: Path, image: tio.Image) -> tio.Image:
    """``image`` unchanged, or a DataError naming ``path`` and how many voxels are NaN/inf."""
    bad = int((~torch.isfinite(image.data.to(torch.float32))).sum())
    if bad:
        raise DataError(f"case {case_id}: {path} contains {bad} NaN/inf voxels")
    return image


def _check_not_constant(case_id: str, path: Path, image: tio.Image) -> tio.Image:
    """``image`` unchanged, or a DataError naming ``path`` if every voxel has the same value.

    Refused on loading, not where it would fail later: an all-zero image leaves the nonzero
    crop an empty box (numpy's "zero-size array to reduction" deep in the fingerprint), and a
    constant one has no standard deviation to z-score with, or nothing to learn from at all.
    (A file with no voxels never gets here: both readers refuse it.)
    """
    low, high = image.data.min().item(), image.data.max().item()
    if low == high:
        raise DataError(f"case {case_id}: {path}: image is constant (all voxels = {float(low)}): "
                        "nothing to crop or normalise")
    return image


def _read_single_channel(case_id: str, path: Path) -> tio.ScalarImage:
    image = read_image(case_id, path, tio.ScalarImage)
    if image.num_channels != 1:
        raise DataError(f"case {case_id}: {path} has {image.num_channels} channels, expected 1")
    return _check_not_constant(case_id, path, check_finite(case_id, path, image))


def _read_label(case_id: str, path: Path, label_values: Collection[int] | None) -> tio.LabelMap:
    label = read_image(case_id, path, tio.LabelMap)
    if label.num_channels != 1:
        raise DataError(f"case {case_id}: label {path} has {label.num_channels} channels, expected 1")
    values = torch.unique(label.data).tolist()
    non_integer = [v for v in values if not float(v).is_integer()]
    if non_integer:
        raise DataError(f"case {case_id}: label {path} has non-integer values {non_integer[:5]}")
    if label_values is not None:
        unexpected = sorted(int(v) for v in values if int(v) not in set(label_values))
        if unexpected:
            raise DataError(
                f"case {case_id}: label {path} has values {unexpected} outside the allowed {sorted(label_values)}"
            )
    limits = torch.iinfo(LABEL_DTYPE)
    if min(values) < limits.min or max(values) > limits.max:
        raise DataError(f"case {case_id}: label {path} has values outside [{limits.min}, {limits.max}]")
    label.set_data(label.data.to(LABEL_DTYPE))
    return label


def _check_same_grid(case_id: str, ref_path: Path, ref: tio.Image, path: Path, image: tio.Image) -> None:
    if image.spatial_shape != ref.spatial_shape:
        raise DataError(
            f"case {case_id}: {path} has shape {image.spatial_shape} but {ref_path} has {ref.spatial_shape}"
        )
    if not np.allclose(image.affine, ref.affine, rtol=0, atol=GEOMETRY_TOLERANCE):
        raise DataError(
            f"case {case_id}: {path} has a different geometry (affine) than {ref_path}:\n"
            f"{np.round(image.affine, 4)}\nvs\n{np.round(ref.affine, 4)}"
        )


def nonzero_mask(data: torch.Tensor) -> torch.Tensor:
    """Voxels where any channel of a [C, *spatial] tensor is nonzero: the head of a skull-stripped scan."""
    return (data != 0).any(dim=0)


def preprocess_subject(
    subject: tio.Subject, crop_margin: int, preprocessing: Preprocessing | None = None
) -> tuple[tio.Subject, dict]:
    """Canonical orientation, per-channel normalisation, crop to the nonzero mask, resampling.

    The mask is "any channel nonzero" (skull-stripped scans are 0 outside the head;
    a CT is nonzero nearly everywhere, so it is barely cropped). ``preprocessing``
    defaults to BraTS's: z-score inside the mask, native spacing. Images are
    resampled only where their spacing differs from the target (labels nearest
    neighbour). Returns the subject and JSON-serialisable properties that
    ``to_raw_geometry`` uses.
    """
    case_id = subject.get("case_id", "<unnamed>")
    names = subject.get("channels", [str(i) for i in range(subject["image"].num_channels)])
    preprocessing = preprocessing or Preprocessing.head_mask(subject["image"].num_channels)
    if len(preprocessing.normalization) != subject["image"].num_channels:
        raise ValueError(f"case {case_id}: {subject['image'].num_channels} channels but "
                         f"{len(preprocessing.normalization)} normalisation rules")
    canonical = tio.ToCanonical()(subject)
    image = canonical["image"]
    mask = nonzero_mask(image.data)
    if not mask.any():
        raise DataError(f"case {case_id}: every voxel of every channel is 0, no foreground to normalise")
    normalised = _normalise(case_id, names, image, mask[None], preprocessing.normalization)
    result = tio.Subject(
        image=tio.ScalarImage(tensor=normalised, affine=image.affine),
        case_id=case_id,
        channels=names,
    )
    if "label" in canonical:
        result.add_image(tio.LabelMap(tensor=canonical["label"].data, affine=image.affine), "label")
    start, stop = bounding_box(mask, crop_margin)
    shape = np.asarray(image.spatial_shape)
    result = tio.Crop(tuple(int(v) for pair in zip(start, shape - stop) for v in pair))(result)
    resampled = preprocessing.needs_resampling(result["image"].spacing)
    if resampled:
        result = tio.Resample(preprocessing.target_spacing, image_interpolation=preprocessing.image_interpolation,
                              label_interpolation="nearest")(result)
    properties = _geometry_properties(subject["image"], shape, start, stop, crop_margin, result["image"])
    return result, {**properties, "resampled": bool(resampled)}


def _geometry_properties(
    raw: tio.Image, canonical_shape: np.ndarray, start: np.ndarray, stop: np.ndarray, margin: int, out: tio.Image
) -> dict:
    """JSON-serialisable record of raw and preprocessed geometry and the crop box (canonical voxels)."""
    return {
        "raw_shape": list(raw.spatial_shape),
        "raw_spacing": [float(s) for s in raw.spacing],
        "raw_affine": raw.affine.tolist(),
        "raw_orientation": "".join(raw.orientation),
        "canonical_shape": [int(s) for s in canonical_shape],
        "crop_start": [int(s) for s in start],
        "crop_stop": [int(s) for s in stop],
        "crop_margin": int(margin),
        "preprocessed_shape": list(out.spatial_shape),
        "preprocessed_spacing": [float(s) for s in out.spacing],
        "preprocessed_affine": out.affine.tolist(),
    }


def _normalise(case_id: str, names: list[str], image: tio.ScalarImage, mask: torch.Tensor,
               rules: tuple[ChannelNormalization, ...]) -> torch.Tensor:
    """Each channel by its own rule (a CT channel next to an MR one is normalised differently)."""
    channels = []
    for index, (name, rule) in enumerate(zip(names, rules)):
        channel = tio.ScalarImage(tensor=image.data[index : index + 1].to(torch.float32), affine=image.affine)
        if rule.scheme == "nonzero_zscore":
            channels.append(_zscore_inside_mask(case_id, [name], channel, mask))
        elif rule.scheme == "zscore":
            channels.append(_zscore(case_id, name, channel))
        else:
            channels.append(_ct_normalise(channel.data, rule))
    return torch.cat(channels).to(torch.float32)


def _zscore(case_id: str, name: str, channel: tio.ScalarImage) -> torch.Tensor:
    """Per-image z-score over the whole image (MR without a background of zeros)."""
    if channel.data.std() == 0:
        raise DataError(f"case {case_id}: channel {name} is constant")
    return tio.ZNormalization()(channel).data


def _ct_normalise(data: torch.Tensor, rule: ChannelNormalization) -> torch.Tensor:
    """Clip to the dataset's foreground percentiles, z-score with its foreground mean and std.

    Hand-written: torchio's ZNormalization z-scores with the image's own statistics,
    while CT uses the dataset's (Hounsfield units mean the same in every scan).
    """
    low, high = rule.clip
    return (data.clamp(low, high) - rule.mean) / rule.std


def _zscore_inside_mask(case_id: str, names: list[str], image: tio.ScalarImage, mask: torch.Tensor) -> torch.Tensor:
    """Per-channel z-score over the mask, 0 outside it.

    torchio's ZNormalization pools all channels of one image, so each channel
    becomes its own image of a temporary subject.
    """
    keys = [f"channel_{i}" for i in range(image.num_channels)]
    for name, channel in zip(names, image.data):
        if channel[mask[0]].std() == 0:
            raise DataError(f"case {case_id}: channel {name} is constant inside the head mask")
    temporary = tio.Subject(
        {key: tio.ScalarImage(tensor=image.data[i : i + 1], affine=image.affine) for i, key in enumerate(keys)},
        **{MASK_KEY: tio.LabelMap(tensor=mask.to(torch.uint8), affine=image.affine)},
    )
    normalise = tio.Compose([tio.ZNormalization(masking_method=MASK_KEY), tio.Mask(masking_method=MASK_KEY)])
    normalised = normalise(temporary)
    return torch.cat([normalised[key].data for key in keys]).to(torch.float32)


def bounding_box(mask: torch.Tensor, margin: int) -> tuple[np.ndarray, np.ndarray]:
    """Half-open [start, stop) voxel box of a 3D mask, grown by ``margin`` and clipped."""
    coords = torch.nonzero(mask).numpy()
    start = np.maximum(coords.min(axis=0) - margin, 0)
    stop = np.minimum(coords.max(axis=0) + 1 + margin, np.asarray(mask.shape))
    return start, stop


def prepare_dataset(
    cases: list[CaseFiles],
    out_dir: Path,
    label_values: Collection[int] | None,
    crop_margin: int,
    progress: bool = True,
    preprocessing: Preprocessing | None = None,
    metadata: Mapping[str, dict] | None = None,
    workers: int = 1,
) -> dict:
    """Preprocess every case into ``out_dir`` (images/, labels/, dataset.json), atomically.

    Everything is written to a temporary sibling directory that replaces
    ``out_dir`` only once every case succeeded; on any error it is removed and a
    pre-existing ``out_dir`` is left exactly as it was. ``label_values`` may be
    a mapping value -> name (e.g. BRATS_LABELS) to name the labels in dataset.json.
    ``preprocessing`` is the plan's (default: BraTS's head-mask z-score, see
    ``preprocess_subject``); ``metadata`` maps further JSON file names (the
    fingerprint and plan) to their content, written in the same atomic swap. ``workers``
    processes preprocess cases side by side; the files are the same for any count.
    Returns the dataset.json content.
    """
    channels = _common_channels(cases)
    with staged_directory(Path(out_dir)) as staging:
        (staging / "images").mkdir()
        (staging / "labels").mkdir()
        prepare = partial(_prepare_case, staging=staging, label_values=label_values, crop_margin=crop_margin,
                          preprocessing=preprocessing)
        entries, seen_labels = {}, set()
        for case, (entry, labels) in zip(cases, map_cases(prepare, cases, workers, desc="prepare", progress=progress)):
            entries[case.case_id] = entry
            seen_labels |= labels
        dataset = {"channels": channels, "labels": _label_names(label_values, seen_labels), "cases": entries,
                   "intensity_ranges": dataset_ranges([e["intensity_range"] for e in entries.values()], channels)}
        (staging / DATASET_JSON).write_text(json.dumps(dataset, indent=2))
        for name, content in (metadata or {}).items():
            (staging / name).write_text(json.dumps(content, indent=2))
    return dataset


def _common_channels(cases: list[CaseFiles]) -> list[str]:
    if not cases:
        raise DataError("no cases to prepare")
    channels = list(cases[0].images)
    seen: set[str] = set()
    for case in cases:
        if list(case.images) != channels:
            raise DataError(f"case {case.case_id}: channels {list(case.images)} differ from {channels}")
        if case.case_id in seen:
            raise DataError(f"case {case.case_id}: case id appears twice")
        seen.add(case.case_id)
    return channels


def _prepare_case(
    case: CaseFiles, staging: Path, label_values: Collection[int] | None, crop_margin: int,
    preprocessing: Preprocessing | None,
) -> tuple[dict, set[int]]:
    """Write one preprocessed case into the staging folder; its dataset.json entry and the label values it holds."""
    seen_labels: set[int] = set()
    raw = load_case(case, label_values)
    subject, properties = preprocess_subject(raw, crop_margin, preprocessing)
    image_rel = f"images/{case.case_id}{IMAGE_SUFFIX}"
    subject["image"].save(staging / image_rel)
    entry = {
        "image": image_rel,
        "label": None,
        "raw_images": {name: str(Path(path).resolve()) for name, path in case.images.items()},
        "raw_label": None,
        "subset": case.subset,
        "properties": properties,
        "intensity_range": image_ranges(raw["image"].data),
    }
    if "label" in subject:
        seen_labels.update(int(v) for v in torch.unique(subject["label"].data))
        label_rel = f"labels/{case.case_id}{IMAGE_SUFFIX}"
        subject["label"].save(staging / label_rel)
        entry["label"] = label_rel
        entry["raw_label"] = str(Path(case.label).resolve())
    return entry, seen_labels


def _label_names(label_values: Collection[int] | None, seen_labels: set[int]) -> dict[str, str]:
    """JSON keys must be strings; without given names a value is its own name."""
    if isinstance(label_values, Mapping):
        return {str(int(v)): str(name) for v, name in sorted(label_values.items())}
    values = sorted(seen_labels if label_values is None else {int(v) for v in label_values})
    return {str(v): str(v) for v in values}


def load_preprocessed(dataset_dir: Path, case_id: str) -> tio.Subject:
    """Subject of one prepared case: ``image``, ``label`` (when labelled), ``case_id``."""
    dataset_dir = Path(dataset_dir)
    entry = _dataset_entry(dataset_dir, case_id)
    subject = tio.Subject(image=tio.ScalarImage(dataset_dir / entry["image"]), case_id=case_id)
    if entry["label"] is not None:
        subject.add_image(tio.LabelMap(dataset_dir / entry["label"]), "label")
    return subject


def _dataset_entry(dataset_dir: Path, case_id: str) -> dict:
    path = dataset_dir / DATASET_JSON
    try:
        cases = json.loads(path.read_text())["cases"]
    except (OSError, ValueError, KeyError) as error:
        raise DataError(f"cannot read prepared dataset index {path}: {error}") from error
    if case_id not in cases:
        raise DataError(f"case {case_id}: not in prepared dataset {path}")
    return cases[case_id]


def to_raw_geometry(label_or_probs: torch.Tensor, properties: dict, reference: Path | tio.Image) -> tio.Image:
    """Map a prediction from preprocessed space onto the raw grid of ``reference`` (a file, or an image
    already loaded from it, which saves reading it again).

    Integer/bool tensors are label maps (nearest neighbour); floating tensors are
    probabilities (linear) and are 0 outside the crop box, so an argmax there
    picks channel 0. Accepts [C, *spatial] or [*spatial]. Resampling to the raw
    reference undoes the crop, the reorientation and any spacing change in one
    step, so the result has the raw file's size, spacing, origin and direction.
    Where preprocessing changed the spacing, map probabilities (nnU-Net's order:
    interpolate, then argmax on the raw grid), not labels.
    """
    if not isinstance(reference, tio.Image):
        if not Path(reference).is_file():
            raise DataError(f"reference image {reference} does not exist")
        reference = tio.ScalarImage(reference, reader=read_image_file)
    tensor = label_or_probs.detach().cpu()
    tensor = tensor if tensor.ndim == 4 else tensor[None]
    if list(tensor.shape[1:]) != list(properties["preprocessed_shape"]):
        raise ValueError(
            f"prediction shape {list(tensor.shape[1:])} is not the preprocessed shape "
            f"{properties['preprocessed_shape']}"
        )
    affine = np.asarray(properties["preprocessed_affine"], dtype=np.float64)
    if tensor.is_floating_point():
        image: tio.Image = tio.ScalarImage(tensor=tensor.to(torch.float32), affine=affine)
        if properties.get("resampled"):
            # torchio floors the resampled size, so the grid can end up to one voxel inside the raw
            # extent; replicating its border voxel keeps raw border voxels from being extrapolated
            # as "no class at all" (0 everywhere).
            image = tio.Pad(1, padding_mode="edge")(image)
    else:
        image = tio.LabelMap(tensor=tensor.to(torch.int64), affine=affine)
    return tio.Resample(target=reference)(image)
