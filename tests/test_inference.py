"""Sliding-window prediction against whole-volume runs of the same model and brute-force mirror TTA."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from nnmamba.inference import predict_labels, sliding_window_predict


def one_hot_volume(shape: tuple[int, ...], classes: int, seed: int) -> torch.Tensor:
    labels = torch.randint(0, classes, shape, generator=torch.Generator().manual_seed(seed))
    return nn.functional.one_hot(labels, classes).movedim(-1, 1).float()


def conv_model(in_ch: int, out_ch: int, seed: int, hidden: int = 8) -> nn.Module:
    """Translation-equivariant: a 3x3x3 conv (receptive-field radius 1), tanh, a pointwise conv."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv3d(in_ch, hidden, 3, padding=1), nn.Tanh(), nn.Conv3d(hidden, out_ch, 1))


def mirror_symmetric_model(in_ch: int, out_ch: int, seed: int) -> nn.Module:
    """Flip-equivariant along every axis: each 3x3x3 kernel is averaged over its 8 mirror images."""
    model = nn.Sequential(nn.Conv3d(in_ch, 6, 3, padding=1), nn.ReLU(), nn.Conv3d(6, out_ch, 3, padding=1))
    torch.manual_seed(seed)
    with torch.no_grad():
        for conv in (model[0], model[2]):
            kernel = torch.randn_like(conv.weight)
            flips = [dims for k in range(4) for dims in itertools.combinations((2, 3, 4), k)]
            conv.weight.copy_(sum(torch.flip(kernel, dims) for dims in flips) / len(flips))
    return model


def whole_volume(model: nn.Module, image: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return torch.softmax(model(image), dim=1)


@pytest.mark.parametrize("mode", ["gaussian", "constant"])
@pytest.mark.parametrize("overlap", [0.0, 0.25, 0.5, 0.8])
def test_identity_model_reconstructs_its_input(overlap: float, mode: str) -> None:
    image = one_hot_volume((2, 37, 45, 29), classes=4, seed=0)
    patch = (16, 20, 12)
    out = sliding_window_predict(nn.Identity(), image, patch, overlap=overlap, mode=mode, activation=None)
    assert out.dtype == torch.float32 and out.device.type == "cpu"
    torch.testing.assert_close(out, image, rtol=0, atol=1e-6)
    out += 1.0  # an ordinary tensor, not an inference tensor: callers may accumulate into it


def test_default_activation_is_softmax_over_channels() -> None:
    image = one_hot_volume((2, 20, 18, 22), classes=3, seed=1) * 4.0
    out = sliding_window_predict(nn.Identity(), image, (8, 8, 8))
    torch.testing.assert_close(out, torch.softmax(image, dim=1), rtol=0, atol=1e-6)


def test_volume_smaller_than_the_patch_is_padded_and_cropped_back() -> None:
    """Zero padding up to the patch equals the convolution's own zero padding, so the match is exact."""
    image = torch.randn(2, 2, 5, 7, 3)
    model = conv_model(2, 3, seed=2)
    out = sliding_window_predict(model, image, (8, 8, 8))
    assert out.shape == (2, 3, 5, 7, 3)
    torch.testing.assert_close(out, whole_volume(model, image), rtol=0, atol=1e-6)


def test_batch_axis_is_optional_and_samples_are_independent() -> None:
    images = torch.randn(3, 1, 20, 24, 18)
    model = conv_model(1, 4, seed=3)
    batched = sliding_window_predict(model, images, (12, 12, 12), sw_batch_size=3)
    assert batched.shape == (3, 4, 20, 24, 18)
    for i, image in enumerate(images):
        single = sliding_window_predict(model, image, (12, 12, 12))
        assert single.shape == (1, 4, 20, 24, 18)
        torch.testing.assert_close(single[0], batched[i], rtol=0, atol=1e-6)


def test_sliding_windows_match_the_whole_volume_in_the_interior() -> None:
    """Tolerance: a window's outputs within the receptive field (1 voxel) of its own edges saw zero padding
    instead of the true neighbours. Gaussian weighting gives them a small weight, but not zero: MONAI clamps
    its 3D importance map at 1e-3, which for a voxel 6 voxels from the centre of a 24-voxel window is ~1/6 of
    the best window's weight. Measured here: max |difference| 1.2e-2 in probability, mean 1.6e-4, more than
    8 voxels from the volume border (closer, every window sees the voxel near one of its edges: up to 9e-2).
    Constant weighting misses this tolerance (max 1.0e-1, mean 5e-3), so the Gaussian weighting is checked
    too."""
    image = torch.randn(1, 1, 64, 72, 56, generator=torch.Generator().manual_seed(4))
    model = conv_model(1, 3, seed=4)
    windowed = sliding_window_predict(model, image, (24, 24, 24), overlap=0.5)
    difference = (windowed - whole_volume(model, image)).abs()
    interior = difference[..., 8:-8, 8:-8, 8:-8]
    assert interior.max() < 3e-2
    assert interior.mean() < 3e-3


def test_mirroring_a_flip_equivariant_model_changes_nothing() -> None:
    image = torch.randn(1, 2, 24, 22, 20, generator=torch.Generator().manual_seed(5))
    model = mirror_symmetric_model(2, 3, seed=5)
    plain = sliding_window_predict(model, image, (16, 16, 16))
    mirrored = sliding_window_predict(model, image, (16, 16, 16), mirror_axes=(0, 1, 2))
    # Flipped convolutions sum in another order: float32 rounding up to ~5e-6; a view not flipped back
    # would be off by ~1e-1.
    torch.testing.assert_close(mirrored, plain, rtol=0, atol=2e-5)


@pytest.mark.parametrize("mirror_axes", [(0, 1, 2), (1,), (2, 0)])
def test_mirroring_averages_every_flipped_view_flipped_back(mirror_axes: tuple[int, ...]) -> None:
    """One window covers the volume, so the reference is the mean over all 2^k flips of whole-volume runs."""
    image = torch.randn(1, 1, 12, 14, 10, generator=torch.Generator().manual_seed(6))
    model = conv_model(1, 3, seed=6)
    dims = [axis + 2 for axis in mirror_axes]
    subsets = [subset for k in range(len(dims) + 1) for subset in itertools.combinations(dims, k)]
    expected = sum(torch.flip(whole_volume(model, torch.flip(image, s)), s) for s in subsets) / len(subsets)
    mirrored = sliding_window_predict(model, image, (12, 14, 10), mirror_axes=mirror_axes)
    torch.testing.assert_close(mirrored, expected, rtol=0, atol=1e-6)
    assert (mirrored - whole_volume(model, image)).abs().max() > 1e-2  # the model is not mirror-symmetric


def test_runs_in_eval_mode_and_restores_training_mode() -> None:
    model = nn.Sequential(conv_model(1, 2, seed=7), nn.Dropout(p=0.9))
    model.train()
    image = torch.randn(1, 1, 10, 10, 10)
    out = sliding_window_predict(model, image, (10, 10, 10))
    assert model.training
    torch.testing.assert_close(out, whole_volume(model, image), rtol=0, atol=1e-6)


def test_autocast_output_is_float32_and_close_to_full_precision() -> None:
    image = torch.randn(1, 1, 20, 20, 20, generator=torch.Generator().manual_seed(8))
    model = conv_model(1, 3, seed=8)
    full = sliding_window_predict(model, image, (12, 12, 12), device="cpu")
    mixed = sliding_window_predict(model, image, (12, 12, 12), device="cpu", amp_dtype=torch.bfloat16)
    assert mixed.dtype == torch.float32
    torch.testing.assert_close(mixed, full, rtol=0, atol=2e-2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_model_gives_cpu_float32_output_matching_cpu_run() -> None:
    image = torch.randn(1, 1, 40, 36, 30, generator=torch.Generator().manual_seed(9))
    model = conv_model(1, 3, seed=9)
    on_cpu = sliding_window_predict(model, image, (16, 16, 16), mirror_axes=(0, 1))
    on_gpu = sliding_window_predict(model, image, (16, 16, 16), mirror_axes=(0, 1), device="cuda")
    assert on_gpu.device.type == "cpu" and on_gpu.dtype == torch.float32
    torch.testing.assert_close(on_gpu, on_cpu, rtol=0, atol=1e-4)
    mixed = sliding_window_predict(model, image, (16, 16, 16), device="cuda", amp_dtype=torch.float16)
    torch.testing.assert_close(mixed, sliding_window_predict(model, image, (16, 16, 16)), rtol=0, atol=1e-2)


def test_predict_labels_is_the_argmax_of_the_probabilities() -> None:
    image = torch.randn(2, 1, 18, 20, 16, generator=torch.Generator().manual_seed(10))
    model = conv_model(1, 4, seed=10)
    labels = predict_labels(model, image, (12, 12, 12), overlap=0.25, mirror_axes=(2,))
    probabilities = sliding_window_predict(model, image, (12, 12, 12), overlap=0.25, mirror_axes=(2,))
    assert labels.dtype == torch.int64 and labels.shape == (2, 18, 20, 16)
    assert torch.equal(labels, probabilities.argmax(dim=1))
    assert len(labels.unique()) > 1


@pytest.mark.parametrize(
    ("shape", "mirror_axes", "message"),
    [
        ((20, 20, 20), (), r"\[C, D, H, W\]"),
        ((1, 20, 20, 20), (3,), "mirror_axes"),
        ((1, 20, 20, 20), (0, 0), "mirror_axes"),
    ],
)
def test_bad_input_raises_one_clear_error(shape, mirror_axes, message) -> None:
    with pytest.raises(ValueError, match=message):
        sliding_window_predict(nn.Identity(), torch.zeros(shape), (8, 8, 8), mirror_axes=mirror_axes)
