"""In-memory training batches for throughput benchmarks: what a patch loader hands the GPU, without disk or augmentation."""

from __future__ import annotations

import torch

# The paper's AMOS-style segmentation setting the training benchmarks run: one input channel,
# 16 classes, B=2 patches of 128^3 per GPU.
IN_CHANNELS, CLASSES, BATCH, PATCH = 1, 16, 2, (128, 128, 128)


def synthetic_batches(count: int, batch: int, in_channels: int, classes: int, spatial: tuple[int, ...],
                      seed: int) -> list[dict[str, torch.Tensor]]:
    """`count` batches of float32 images and int64 label maps on the CPU, pinned when a GPU is present.

    The shapes of `nnmamba.data.loading.sampling.collate_patches`'s batches, in its widest types (the
    training loader hands over bf16 images and uint8 labels under bf16 autocast), so each step
    pays at least the host-to-device copy a real loader's batch costs.
    """
    generator = torch.Generator().manual_seed(seed)
    pin = torch.cuda.is_available()
    batches = []
    for _ in range(count):
        image = torch.randn(batch, in_channels, *spatial, generator=generator)
        label = torch.randint(0, classes, (batch, 1, *spatial), generator=generator)
        batches.append({"image": image.pin_memory() if pin else image, "label": label.pin_memory() if pin else label})
    return batches


def segmentation_batches(seed: int, batch: int = BATCH,
                         patch: tuple[int, ...] = PATCH) -> list[dict[str, torch.Tensor]]:
    """Four batches of the training benchmarks' segmentation setting, cycled through by their loops."""
    return synthetic_batches(4, batch, IN_CHANNELS, CLASSES, patch, seed)
