"""Whole-volume prediction from a patch-trained network: Gaussian-weighted sliding windows + mirror TTA.

Networks are trained on patches, so a full volume is predicted window by window and the overlapping
window outputs are blended with a Gaussian importance map (centre voxels, which saw the most context,
weigh most); MONAI's ``sliding_window_inference`` does the tiling, padding of volumes smaller than the
patch, blending and cropping back. What is blended is the ACTIVATED output (softmax probabilities for
segmentation), as nnU-Net does: averaging probabilities is bounded and calibrated, averaging logits
lets one over-confident window dominate.

Mirror test-time augmentation (nnU-Net style) is applied per window inside the predictor: the window is
flipped along every subset of ``mirror_axes`` (2^k views, identity included), each output is flipped back
and the views are averaged. Doing it per window reuses one tiling and one blending pass for all views.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from functools import partial
from typing import Any

import numpy as np
import torch
from monai.inferers import sliding_window_inference
from torch import nn

from nnmamba.heatmaps import decode_heatmaps

Activation = Callable[[torch.Tensor], torch.Tensor]

SOFTMAX_OVER_CHANNELS: Activation = partial(torch.softmax, dim=1)

_SPATIAL_DIMS = 3


def sliding_window_predict(
    model: nn.Module,
    image: torch.Tensor,
    patch_size: Sequence[int],
    overlap: float = 0.5,
    sw_batch_size: int = 2,
    mode: str = "gaussian",
    mirror_axes: Sequence[int] = (),
    device: torch.device | str | None = None,
    amp_dtype: torch.dtype | None = None,
    activation: Activation | None = SOFTMAX_OVER_CHANNELS,
    progress: bool = False,
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Activated network output for whole volumes, as float32 [B, K, D, H, W] on the CPU.

    The image moves to the compute device once and the windows are blended there: blending on
    the CPU would ship every window's output across the bus and add it up on a few CPU cores,
    which costs more than the network itself on a GPU. Only the result crosses to the CPU.

    Args:
        model: maps [N, C, *patch_size] to [N, K, *patch_size]; run in eval mode (restored afterwards).
        image: [C, D, H, W] or [B, C, D, H, W]; a missing batch axis is added (B = 1).
        patch_size: window size (D, H, W); volumes smaller than it are zero-padded, output cropped back.
        overlap: fraction of a window shared with its neighbour, in [0, 1).
        sw_batch_size: windows per network call.
        mode: blending weights, ``"gaussian"`` or ``"constant"``.
        mirror_axes: spatial axes (0 = D, 1 = H, 2 = W) to mirror for test-time augmentation.
        device: where the network runs; the model is moved there. None: where its parameters are.
        amp_dtype: autocast dtype for the network call (torch.float16 / torch.bfloat16); None: no autocast.
        activation: applied to the network output before blending, in float32; softmax over channels for
            segmentation, None for outputs to blend as they are (landmark heatmaps).
        progress: show a progress bar over windows.
        reduce: applied to the blended output on the compute device before it moves to the CPU (an
            argmax over channels, say); its result is returned instead.
    """
    batch = _as_batch(image)
    flip_dims = _mirror_flip_dims(mirror_axes)
    compute_device = torch.device(device) if device is not None else _parameter_device(model)
    model.to(compute_device)
    predictor = partial(
        _predict_window, model=model, activation=activation, flip_dims=flip_dims, amp_dtype=amp_dtype
    )
    with _eval_mode(model), torch.inference_mode():
        blended = sliding_window_inference(
            batch.to(compute_device, torch.float32),
            roi_size=tuple(patch_size),
            sw_batch_size=sw_batch_size,
            predictor=predictor,
            overlap=overlap,
            mode=mode,
            sw_device=compute_device,
            device=compute_device,
            progress=progress,
        )
        result = reduce(blended) if reduce is not None else blended
    # A copy made outside inference mode is an ordinary tensor: callers may update it in place
    # (summing a fold ensemble, say), which PyTorch forbids on inference tensors.
    return result.to("cpu", copy=True)


def predict_labels(
    model: nn.Module, image: torch.Tensor, patch_size: Sequence[int], **kwargs: Any
) -> torch.Tensor:
    """Label map int64 [B, D, H, W]: argmax over channels of ``sliding_window_predict`` (same keywords).

    The argmax runs on the compute device, so only the label map crosses to the CPU.
    """
    return sliding_window_predict(model, image, patch_size, reduce=partial(torch.argmax, dim=1), **kwargs)


def predict_landmarks(
    model: nn.Module, image: torch.Tensor, affine: np.ndarray, patch_size: Sequence[int], **kwargs: Any
) -> np.ndarray:
    """World coordinates (mm) [K, 3] of each landmark in one [C, D, H, W] image with voxel -> world ``affine``.

    The heatmaps are blended as the network outputs them (no activation) and decoded by
    ``decode_heatmaps``; keywords are ``sliding_window_predict``'s. Leave out of ``mirror_axes`` any axis
    whose mirror swaps landmarks: mirrored left/right, the channel of a left landmark fires on the right.
    """
    heatmaps = sliding_window_predict(model, image, patch_size, activation=None, **kwargs)
    return decode_heatmaps(heatmaps[0], affine)


def _predict_window(
    window: torch.Tensor,
    model: nn.Module,
    activation: Activation | None,
    flip_dims: list[tuple[int, ...]],
    amp_dtype: torch.dtype | None,
) -> torch.Tensor:
    """Mean over mirrored views of the activated output of a batch of windows, flipped back."""
    total = None
    for dims in flip_dims:
        output = _activated(model, torch.flip(window, dims) if dims else window, activation, amp_dtype)
        output = torch.flip(output, dims) if dims else output
        # Out of place: a model may return its input, and the window may be a view of the image.
        total = output if total is None else total + output
    return total / len(flip_dims)


def _activated(
    model: nn.Module, window: torch.Tensor, activation: Activation | None, amp_dtype: torch.dtype | None
) -> torch.Tensor:
    autocast = torch.autocast(window.device.type, dtype=amp_dtype) if amp_dtype is not None else nullcontext()
    with autocast:
        output = model(window)
    output = output.float()
    return activation(output) if activation is not None else output


def _as_batch(image: torch.Tensor) -> torch.Tensor:
    if image.ndim == _SPATIAL_DIMS + 1:
        return image[None]
    if image.ndim == _SPATIAL_DIMS + 2:
        return image
    raise ValueError(f"image must be [C, D, H, W] or [B, C, D, H, W], got shape {tuple(image.shape)}")


def _mirror_flip_dims(mirror_axes: Sequence[int]) -> list[tuple[int, ...]]:
    """Tensor dims to flip for each view: every subset of the spatial mirror axes, the identity first."""
    axes = tuple(mirror_axes)
    if len(set(axes)) != len(axes) or not all(a in range(_SPATIAL_DIMS) for a in axes):
        raise ValueError(f"mirror_axes must be distinct spatial axes among 0, 1, 2 (D, H, W), got {axes}")
    tensor_dims = [a + 2 for a in axes]
    return [subset for k in range(len(axes) + 1) for subset in itertools.combinations(tensor_dims, k)]


def _parameter_device(model: nn.Module) -> torch.device:
    first = next(model.parameters(), None)
    return first.device if first is not None else torch.device("cpu")


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode for the duration (no dropout, running BN statistics), the caller's mode restored after."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def class_probabilities(
    model: nn.Module,
    image: torch.Tensor,
    mirror_axes: Sequence[int] = (),
    device: torch.device | str | None = None,
    amp_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Softmax class probabilities, float32 [B, K] on the CPU, of whole volumes [C, D, H, W] or [B, C, D, H, W].

    A classifier sees the whole volume at once, so there is no tiling; mirror TTA averages the
    probabilities of every flipped view, as `sliding_window_predict` does per window.
    """
    batch = _as_batch(image).float()
    compute_device = torch.device(device) if device is not None else _parameter_device(model)
    model.to(compute_device)
    batch = batch.to(compute_device)
    views = _mirror_flip_dims(mirror_axes)
    with _eval_mode(model), torch.inference_mode():
        total = sum(_activated(model, torch.flip(batch, dims) if dims else batch, SOFTMAX_OVER_CHANNELS, amp_dtype)
                    for dims in views)
    return (total / len(views)).cpu().clone()
