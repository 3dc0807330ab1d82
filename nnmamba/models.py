"""nnMamba architectures and the registry that builds them by (task, variant).

The registry is the one entry point the pipeline uses: `build_model(task, variant, in_channels,
out_channels, **kwargs)`. Variants are the ablation rows of the paper's Table 5.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from nnmamba.blocks import DoubleConv, ConvNormAct, MambaInConv, SkipScale, mamba_factory, residual_stage
from nnmamba.upsampling import upsample_trilinear_2x

DENSE_VARIANTS: dict[str, dict[str, bool]] = {
    "baseline": {"use_ssm": False, "siamese": False},
    "mic": {"use_ssm": True, "siamese": False},
    "miccss": {"use_ssm": True, "siamese": True},
}
# Classification ablation (paper Table 5, right): the stem's MICCSS, then the channel-sequential head.
CLASSIFICATION_VARIANTS: dict[str, dict[str, bool]] = {
    "baseline": {"stem_ssm": False, "sequence": False},
    "miccss": {"stem_ssm": True, "sequence": False},
    "sequence": {"stem_ssm": True, "sequence": True},
}


class NnMambaSeg(nn.Module):
    """Residual encoder with MIC/MICCSS branches, conv decoder with skip scaling (paper Fig. 2a).

    Used for segmentation (one output channel per class) and landmark detection (one heatmap
    per landmark). The input's spatial size must be divisible by 16 (four stride-2 stages).
    """

    DOWNSAMPLING = 16

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        variant: str = "miccss",
        base_channels: int = 32,
        blocks_per_stage: int = 3,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        se_reduction: int = 16,
        ssm_backend: str = "auto",
    ):
        super().__init__()
        if variant not in DENSE_VARIANTS:
            raise ValueError(f"unknown dense variant {variant!r}; known: {sorted(DENSE_VARIANTS)}")
        self.variant = variant
        options = DENSE_VARIANTS[variant]
        ssm = mamba_factory(d_state, d_conv, expand, ssm_backend)
        widths = [base_channels * 2**i for i in range(4)]

        def global_branch(channels: int) -> nn.Module | None:
            return MambaInConv(channels, ssm(channels), options["siamese"]) if options["use_ssm"] else None

        self.stem = DoubleConv(in_channels, widths[0], stride=2)
        self.encoder = nn.ModuleList(
            residual_stage(widths[i], widths[i + 1], blocks_per_stage, 2, global_branch(widths[i + 1]))
            for i in range(3)
        )
        self.skip_scales = nn.ModuleList(SkipScale(w, se_reduction) for w in widths[:3])
        self.decoder = nn.ModuleList(DoubleConv(widths[i + 1] + widths[i], widths[i]) for i in reversed(range(3)))
        self.head = nn.Sequential(ConvNormAct(widths[0], widths[0]), nn.Conv3d(widths[0], out_channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if any(s % self.DOWNSAMPLING for s in x.shape[2:]):
            raise ValueError(f"input spatial size {tuple(x.shape[2:])} must be divisible by {self.DOWNSAMPLING}")
        skips = [self.stem(x)]
        for stage in self.encoder:
            skips.append(stage(skips[-1]))
        out = skips.pop()
        for block, scale, skip in zip(self.decoder, reversed(self.skip_scales), reversed(skips)):
            out = block(torch.cat([upsample_trilinear_2x(out), scale(skip)], dim=1))
        return self.head(upsample_trilinear_2x(out))


class NnMambaCls(nn.Module):
    """Residual encoder with a MICCSS after the stem and a channel-sequential head (paper Fig. 2b).

    The encoder is NnMambaSeg's (stem, three residual stages doubling the width) without
    per-block SSM branches: the paper puts the one global branch early, where it gives every
    later convolution global context. `sequence` pools stages 2, 3 and 4 (2C, 4C, 8C channels)
    to 1, 2 and 4 tokens of 2C channels, runs a Mamba over these 7 tokens (residual) and feeds
    them, flattened, to the MLP; the other variants feed the pooled last stage to the MLP.
    Any input size works (global pooling), so whole volumes go in uncropped.
    """

    TOKENS_PER_STAGE = (1, 2, 4)

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        variant: str = "sequence",
        base_channels: int = 32,
        blocks_per_stage: int = 3,
        d_state: int = 8,
        d_conv: int = 4,
        expand: int = 2,
        sequence_d_conv: int = 2,
        dropout: float = 0.5,
        ssm_backend: str = "auto",
    ):
        super().__init__()
        if variant not in CLASSIFICATION_VARIANTS:
            raise ValueError(f"unknown classification variant {variant!r}; known: {sorted(CLASSIFICATION_VARIANTS)}")
        self.variant = variant
        options = CLASSIFICATION_VARIANTS[variant]
        widths = [base_channels * 2**i for i in range(4)]
        self.stem = DoubleConv(in_channels, widths[0], stride=2)
        self.stem_global: nn.Module | None = None
        if options["stem_ssm"]:
            ssm = mamba_factory(d_state, d_conv, expand, ssm_backend)(widths[0])
            self.stem_global = MambaInConv(widths[0], ssm, siamese=True)
        self.encoder = nn.ModuleList(
            residual_stage(widths[i], widths[i + 1], blocks_per_stage, 2, None) for i in range(3)
        )
        self.sequence: nn.Module | None = None
        features = widths[3]
        if options["sequence"]:
            self.sequence = mamba_factory(d_state, sequence_d_conv, expand, ssm_backend)(widths[1])
            features = widths[1] * sum(self.TOKENS_PER_STAGE)
        self.mlp = nn.Sequential(
            nn.Linear(features, base_channels), nn.ReLU(inplace=True), nn.Dropout(dropout),
            nn.Linear(base_channels, out_channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.stem(x)
        if self.stem_global is not None:
            out = out + self.stem_global(out)
        stages = []
        for stage in self.encoder:
            out = stage(out)
            stages.append(out)
        if self.sequence is None:
            return self.mlp(F.adaptive_avg_pool3d(stages[-1], 1).flatten(1))
        tokens = self.channel_sequence(stages)
        return self.mlp((tokens + self.sequence(tokens)).flatten(1))

    def channel_sequence(self, stages: list[torch.Tensor]) -> torch.Tensor:
        """[B, 7, 2C] tokens: stage h (2^(h-1)·C channels) average-pooled, its channels dealt into 2^(h-2) tokens.

        Token t of a stage with k tokens holds channels t, t + k, t + 2k, ... (the authors'
        `reshape(B, 2C, k)`), so weights stay interchangeable with their released code. The
        authors pool by average; the paper's text says max.
        """
        batch, token_width = stages[0].shape[:2]
        parts = [
            F.adaptive_avg_pool3d(features, 1).reshape(batch, token_width, count)
            for features, count in zip(stages, self.TOKENS_PER_STAGE)
        ]
        return torch.cat(parts, dim=2).transpose(1, 2)


ModelBuilder = Callable[..., nn.Module]
_REGISTRY: dict[str, dict[str, ModelBuilder]] = {}


def register(task: str, variant: str, builder: ModelBuilder) -> None:
    """Add a (task, variant) -> builder entry; builders take (in_channels, out_channels, **kwargs)."""
    _REGISTRY.setdefault(task, {})[variant] = builder


def available_variants(task: str) -> tuple[str, ...]:
    """The ablation variants registered for a task, in registration order."""
    if task not in _REGISTRY:
        raise ValueError(f"unknown task {task!r}; known: {sorted(_REGISTRY)}")
    return tuple(_REGISTRY[task])


def build_model(task: str, variant: str, in_channels: int, out_channels: int, **kwargs) -> nn.Module:
    """Build the network of one ablation variant; kwargs are the architecture's own options."""
    variants = _REGISTRY.get(task)
    if variants is None:
        raise ValueError(f"unknown task {task!r}; known: {sorted(_REGISTRY)}")
    if variant not in variants:
        raise ValueError(f"unknown variant {variant!r} for task {task!r}; known: {list(variants)}")
    return variants[variant](in_channels, out_channels, **kwargs)


def count_parameters(model: nn.Module) -> int:
    """Trainable parameters, each shared tensor counted once (as the paper counts them)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


for _task in ("segmentation", "landmark"):
    for _variant in DENSE_VARIANTS:
        register(_task, _variant, partial(NnMambaSeg, variant=_variant))
for _variant in CLASSIFICATION_VARIANTS:
    register("classification", _variant, partial(NnMambaCls, variant=_variant))
