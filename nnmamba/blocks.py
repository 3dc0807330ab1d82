"""Building blocks of the nnMamba networks.

Convolutions, residual blocks, the Mamba-In-Convolution (MIC) branch with its optional
Channel-Spatial Siamese (CSS) views, and the squeeze-excitation skip scaling of the decoder.
The architectures in `nnmamba.models` only compose these.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from nnmamba.ssm import Mamba, Projections

SSMFactory = Callable[[int], nn.Module]


class ConvNormAct(nn.Sequential):
    """Conv3d -> BatchNorm3d -> ReLU, the unit every conv path of the paper is made of."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1):
        super().__init__(
            nn.Conv3d(in_channels, out_channels, kernel_size, stride, padding=kernel_size // 2, bias=False),
            nn.BatchNorm3d(out_channels),
            nn.ReLU(inplace=True),
        )


class DoubleConv(nn.Sequential):
    """Two 3x3x3 ConvNormAct; the first may downsample (the stem) or change width (decoder)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__(
            ConvNormAct(in_channels, out_channels, stride=stride),
            ConvNormAct(out_channels, out_channels),
        )


class ChannelSpatialSiamese(nn.Module):
    """CSS: one SSM with shared weights applied to the sequence and its flips, averaged.

    Views are the sequence itself and its flips over the token dim, the channel dim, and both
    (Algorithm 1 of the paper), all in ONE SSM call. A channel flip of the input is a column
    flip of the in projection, and undoing it on the output a row flip of the out projection, so
    the channel views are weight variants (`Projections`, groups=2) whose outputs the out
    projection already sums; only the token flip is a flipped copy of the data, once each way.
    The 1/4 of the average is folded into the out projection (exact: a power of two).
    """

    def __init__(self, ssm: Mamba):
        super().__init__()
        self.ssm = ssm

    def projections(self) -> Projections:
        """The (plain, channel-flipped) projection pair, out projection scaled by 1/4."""
        in_proj, out_proj = self.ssm.in_proj, self.ssm.out_proj
        in_bias = None if in_proj.bias is None else torch.cat([in_proj.bias, in_proj.bias])
        out_weight = torch.cat([out_proj.weight, out_proj.weight.flip(0)], dim=1) / 4
        out_bias = None if out_proj.bias is None else (out_proj.bias + out_proj.bias.flip(0)) / 4
        return Projections(torch.cat([in_proj.weight, in_proj.weight.flip(1)]), in_bias, out_weight, out_bias, 2)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        views = torch.cat([tokens, tokens.flip(1)], dim=0)
        plain, token_flipped = self.ssm.forward_projected(views, self.projections()).chunk(2, dim=0)
        return plain + token_flipped.flip(1)


class MambaInConv(nn.Module):
    """MIC: out = ConvO(SSM(ConvI(x)) + ConvI(x)), the SSM seeing the volume as a token sequence.

    ConvI/ConvO are 1x1x1 ConvNormAct. The feature map B x C x D x H x W is flattened to B x L x C;
    with channels_last_3d memory this is a view, not a copy. `siamese=True` gives MICCSS.
    """

    def __init__(self, channels: int, ssm: nn.Module, siamese: bool):
        """`ssm` maps [B, L, C] -> [B, L, C]; with `siamese` it must be a `Mamba` (CSS uses its projections)."""
        super().__init__()
        self.conv_in = ConvNormAct(channels, channels, kernel_size=1)
        self.ssm = ChannelSpatialSiamese(ssm) if siamese else ssm
        self.conv_out = ConvNormAct(channels, channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.conv_in(x)
        batch, channels, *spatial = features.shape
        tokens = features.flatten(2).transpose(1, 2)
        mixed = self.ssm(tokens).transpose(1, 2).reshape(batch, channels, *spatial)
        return self.conv_out(mixed + features)


class ResidualBlock(nn.Module):
    """ResNet basic block; an optional global branch (MIC) reads the block input and adds to the residual."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, global_branch: nn.Module | None = None):
        super().__init__()
        self.conv1 = ConvNormAct(in_channels, out_channels, stride=stride)
        self.conv2 = nn.Sequential(
            nn.Conv3d(out_channels, out_channels, 3, padding=1, bias=False), nn.BatchNorm3d(out_channels)
        )
        self.global_branch = global_branch
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv3d(in_channels, out_channels, 1, stride=stride, bias=False), nn.BatchNorm3d(out_channels)
            )
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv2(self.conv1(x))
        if self.global_branch is not None:
            out = out + self.global_branch(x)
        return self.act(out + self.shortcut(x))


def residual_stage(
    in_channels: int, out_channels: int, n_blocks: int, stride: int, global_branch: nn.Module | None
) -> nn.Sequential:
    """A downsampling block followed by n_blocks - 1 blocks that carry the global branch.

    As in the authors' code, the non-first blocks of a stage share ONE global branch module
    (same weights), which brings the AMOS network to 15.97 M parameters (the paper states 15.55 M).
    """
    blocks = [ResidualBlock(in_channels, out_channels, stride)]
    blocks += [ResidualBlock(out_channels, out_channels, global_branch=global_branch) for _ in range(n_blocks - 1)]
    return nn.Sequential(*blocks)


class SkipScale(nn.Module):
    """Skip scaling: X_h * SE(pool(X_h)), a learned per-channel gate on each encoder skip."""

    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        hidden = max(channels // reduction, 1)
        self.gate = nn.Sequential(
            nn.AdaptiveAvgPool3d(1),
            nn.Flatten(),
            nn.Linear(channels, hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, channels),
            nn.Sigmoid(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(x)[:, :, None, None, None]


def mamba_factory(d_state: int = 16, d_conv: int = 4, expand: int = 2, backend: str = "auto") -> SSMFactory:
    """Return a constructor `channels -> Mamba` with the SSM hyper-parameters fixed."""

    def build(channels: int) -> nn.Module:
        return Mamba(channels, d_state=d_state, d_conv=d_conv, expand=expand, backend=backend)

    return build
