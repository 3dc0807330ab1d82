"""U-Mamba (Bot, Enc) and SegMamba: the Mamba segmentation peers no package ships, on `nnmamba.ssm.Mamba`.

Both exist only as research code pinned to mamba-ssm's CUDA kernels (SegMamba to its own fork of them),
so they are rebuilt here on this project's Mamba block, which runs the same arithmetic on those kernels
or in plain PyTorch. The surrounding blocks come from the libraries the authors built on:

* U-Mamba (bowang-lab/U-Mamba, umamba/nnunetv2/nets/UMambaBot_3d.py, UMambaEnc_3d.py): nnU-Net's
  residual U-Net with the topology nnunetv2's planner derives from the spacing and patch
  (`nnmamba.backbones.nnunet_topology`, as the nnunet backbone), dynamic_network_architectures'
  BasicBlockD, and a LayerNorm + Mamba layer over the voxels: at the bottleneck only (Bot) or after
  every encoder stage (Enc). Trained with nnU-Net's deep supervision (`DeepSupervised`).
* SegMamba (ge-xing/SegMamba, model_segmamba/segmamba.py): a Mamba encoder (7³ stride-2 stem, three
  2³ stride-2 downsamplings: /16 in all) whose stages are a gated spatial convolution then
  tri-oriented Mamba layers (`TriOrientedMamba`), beside MONAI's UNETR blocks as skips and decoder.
"""

from __future__ import annotations

import math
import types
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nnmamba.ssm import Mamba, selective_scan


def _monai_blocks() -> types.ModuleType:
    """monai.networks.blocks, imported on first build: importing MONAI loads all of it (about 2 s), which
    every stage that only reads params.yaml (and so the backbone registry) would otherwise pay."""
    from monai.networks import blocks

    return blocks

# --------------------------------------------------------------------------------------------
# U-Mamba
# --------------------------------------------------------------------------------------------


class VoxelMamba(nn.Module):
    """U-Mamba's Mamba layer: LayerNorm, then Mamba over a feature map's voxels as tokens; no residual, as upstream.

    channel_tokens: the channels are the tokens and the voxels the features (U-Mamba Enc does so where a stage
    has no more voxels than channels), so `dim` is then the voxel count and the layer takes one input size only.
    It runs in float32 with autocast off, as upstream's layer does.
    """

    def __init__(self, dim: int, channel_tokens: bool, **mamba_options: Any) -> None:
        super().__init__()
        self.channel_tokens = channel_tokens
        self.norm = nn.LayerNorm(dim)
        self.mamba = Mamba(dim, **mamba_options)

    def forward(self, x: Tensor) -> Tensor:
        with torch.autocast(device_type=x.device.type, enabled=False):
            x = x.float()
            tokens = x.flatten(2) if self.channel_tokens else x.flatten(2).transpose(1, 2)
            mixed = self.mamba(self.norm(tokens))
            return (mixed if self.channel_tokens else mixed.transpose(1, 2)).reshape(x.shape)


def _instance_norm(channels: int) -> nn.InstanceNorm3d:
    return nn.InstanceNorm3d(channels, eps=1e-5, affine=True)  # nnU-Net's 3d_fullres norm


class ResidualBlock(nn.Module):
    """The first block of each U-Mamba stage (its BasicResBlock): conv-norm-act, conv-norm, plus a strided 1×1×1 conv
    shortcut, then the activation. dynamic_network_architectures' BasicBlockD differs in its shortcut (average
    pooling, and a norm after the 1×1×1 conv), hence this block; the stage's further blocks are BasicBlockD."""

    def __init__(self, in_channels: int, out_channels: int, kernel: Sequence[int], stride: Sequence[int]) -> None:
        super().__init__()
        padding = [k // 2 for k in kernel]
        self.conv1 = nn.Conv3d(in_channels, out_channels, kernel, stride, padding)
        self.norm1 = _instance_norm(out_channels)
        self.conv2 = nn.Conv3d(out_channels, out_channels, kernel, 1, padding)
        self.norm2 = _instance_norm(out_channels)
        self.shortcut = nn.Conv3d(in_channels, out_channels, 1, stride)
        self.act = nn.LeakyReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        y = self.norm2(self.conv2(self.act(self.norm1(self.conv1(x)))))
        return self.act(y + self.shortcut(x))


def _stage(in_channels: int, out_channels: int, kernel: Sequence[int], stride: Sequence[int], blocks: int) -> nn.Module:
    """A ResidualBlock (taking the stride) and blocks - 1 BasicBlockD, nnU-Net's conv settings."""
    from dynamic_network_architectures.building_blocks.residual import BasicBlockD  # the [nnunet] extra

    settings = {"conv_bias": True, "norm_op": nn.InstanceNorm3d, "norm_op_kwargs": {"eps": 1e-5, "affine": True},
                "nonlin": nn.LeakyReLU, "nonlin_kwargs": {"inplace": True}}
    return nn.Sequential(ResidualBlock(in_channels, out_channels, kernel, stride),
                         *[BasicBlockD(nn.Conv3d, out_channels, out_channels, kernel, 1, **settings)
                           for _ in range(blocks - 1)])


class ResidualDecoder(nn.Module):
    """U-Mamba's decoder: nearest upsampling then a 1×1×1 conv, concatenation with the skip, a residual stage and a
    1×1×1 head per resolution. `deep_supervision`: every head's logits, full resolution first (nnU-Net's
    convention, which `DeepSupervised` switches), else the full resolution's only."""

    def __init__(self, features: Sequence[int], kernels: Sequence[Sequence[int]], blocks: Sequence[int],
                 out_channels: int, deep_supervision: bool) -> None:
        super().__init__()
        self.deep_supervision = deep_supervision
        levels = range(len(features) - 2, -1, -1)  # the resolutions above the bottleneck, lowest first
        self.upsamples = nn.ModuleList(nn.Conv3d(features[i + 1], features[i], 1) for i in levels)
        self.stages = nn.ModuleList(_stage(2 * features[i], features[i], kernels[i], (1, 1, 1), count)
                                    for i, count in zip(levels, blocks))
        self.heads = nn.ModuleList(nn.Conv3d(features[i], out_channels, 1) for i in levels)

    def forward(self, skips: list[Tensor]) -> Tensor | list[Tensor]:
        x, outputs = skips[-1], []
        for index, (upsample, stage, head) in enumerate(zip(self.upsamples, self.stages, self.heads)):
            skip = skips[-(index + 2)]
            x = stage(torch.cat((upsample(F.interpolate(x, size=skip.shape[2:], mode="nearest")), skip), 1))
            if self.deep_supervision or index == len(self.stages) - 1:
                outputs.append(head(x))
        return outputs[::-1] if self.deep_supervision else outputs[0]


class UMamba(nn.Module):
    """U-Mamba: a residual stem and encoder stages, each followed by its Mamba layer (nn.Identity where it has none),
    and the residual decoder over all stages' outputs."""

    def __init__(self, stem: nn.Module, stages: nn.ModuleList, mambas: nn.ModuleList, decoder: ResidualDecoder) -> None:
        super().__init__()
        self.stem, self.stages, self.mambas, self.decoder = stem, stages, mambas, decoder

    def forward(self, x: Tensor) -> Tensor | list[Tensor]:
        x, skips = self.stem(x), []
        for stage, mamba in zip(self.stages, self.mambas):
            x = mamba(stage(x))
            skips.append(x)
        return self.decoder(skips)


def _lightened(blocks: int, entries: int, stages: int) -> list[int]:
    """U-Mamba's block counts: the plan's count for the first ceil(stages / 2) of `entries`, one for the rest (in
    the encoder its deep stages, in the decoder, listed lowest resolution first, its high-resolution ones)."""
    return [blocks if index < math.ceil(stages / 2) else 1 for index in range(entries)]


def _umamba(name: str, in_channels: int, out_channels: int, input_shape: Sequence[int], spacing: Sequence[float],
            mamba_everywhere: bool, base_features: int = 32, max_features: int = 320, n_conv_per_stage: int = 2,
            n_conv_per_stage_decoder: int = 2, deep_supervision: bool = True, d_state: int = 16, d_conv: int = 4,
            expand: int = 2, ssm_backend: str = "auto") -> nn.Module:
    """U-Mamba on nnU-Net's 3d_fullres plan for this spacing and patch (features 32 → 320, two blocks per stage),
    He-initialised as upstream (`InitWeights_He(1e-2)`)."""
    # backbones registers these builders, so its helpers are imported when one is called
    from nnmamba.backbones import DeepSupervised, nnunet_topology

    pools, kernels = nnunet_topology(name, input_shape, spacing)
    from dynamic_network_architectures.initialization.weight_init import InitWeights_He  # installed with nnunetv2

    count = len(pools)
    features = [min(base_features * 2**i, max_features) for i in range(count)]
    blocks = _lightened(n_conv_per_stage, count, count)
    stem = _stage(in_channels, features[0], kernels[0], (1, 1, 1), blocks[0])
    stages = nn.ModuleList(_stage(features[max(i - 1, 0)], features[i], kernels[i], pools[i], blocks[i])
                           for i in range(count))
    voxels = [math.prod(size // math.prod(p[axis] for p in pools[: i + 1]) for axis, size in enumerate(input_shape))
              for i in range(count)]
    mamba_options = {"d_state": d_state, "d_conv": d_conv, "expand": expand, "backend": ssm_backend}
    if mamba_everywhere:
        mambas = nn.ModuleList(VoxelMamba(min(v, f), v <= f, **mamba_options) for v, f in zip(voxels, features))
    else:
        mambas = nn.ModuleList([*(nn.Identity() for _ in range(count - 1)),
                                VoxelMamba(features[-1], False, **mamba_options)])
    decoder = ResidualDecoder(features, kernels, _lightened(n_conv_per_stage_decoder, count - 1, count), out_channels,
                              deep_supervision)
    network = UMamba(stem, stages, mambas, decoder)
    network.apply(InitWeights_He(1e-2))
    return DeepSupervised(network) if deep_supervision else network


def umamba_bot(in_channels: int, out_channels: int, input_shape: Sequence[int], spacing: Sequence[float],
               **options: Any) -> nn.Module:
    """U-Mamba Bot: one Mamba layer, on the bottleneck's voxels."""
    return _umamba("umamba_bot", in_channels, out_channels, input_shape, spacing, False, **options)


def umamba_enc(in_channels: int, out_channels: int, input_shape: Sequence[int], spacing: Sequence[float],
               **options: Any) -> nn.Module:
    """U-Mamba Enc: a Mamba layer after every encoder stage, full resolution included (sequences of every voxel of
    the patch); over the channels where a stage has no more voxels than channels, so built for one patch size."""
    return _umamba("umamba_enc", in_channels, out_channels, input_shape, spacing, True, **options)


# --------------------------------------------------------------------------------------------
# SegMamba
# --------------------------------------------------------------------------------------------


def _interleave(tokens: Tensor, slices: int) -> Tensor:
    """[b, L, d] tokens slice by slice -> the same tokens position by position across the slices (slice fastest)."""
    batch, length, dim = tokens.shape
    return tokens.reshape(batch, slices, length // slices, dim).transpose(1, 2).reshape(batch, length, dim)


def _deinterleave(tokens: Tensor, slices: int) -> Tensor:
    """The inverse of `_interleave`."""
    batch, length, dim = tokens.shape
    return tokens.reshape(batch, length // slices, slices, dim).transpose(1, 2).reshape(batch, length, dim)


class TriOrientedMamba(Mamba):
    """SegMamba's tri-oriented Mamba (ToM): one block scanning its tokens forward, reversed and across slices.

    The parameters are those of SegMamba's mamba-ssm fork with bimamba_type="v3" (its checkpoints load): the in and
    out projections are shared, and each direction has its own conv1d, x_proj, dt_proj, A_log and D (no suffix:
    forward; "_b": reversed; "_s": inter-slice). As the in projection acts token by token and the out projection is
    linear without bias, a direction is a plain Mamba pass over reordered tokens with its own core, its output put
    back in order; the three are summed. Each pass runs on the CUDA kernels or the torch scan (`backend`).
    """

    def __init__(self, d_model: int, d_state: int = 16, d_conv: int = 4, expand: int = 2,
                 backend: str = "auto") -> None:
        super().__init__(d_model, d_state, d_conv, expand, backend=backend)
        for suffix in ("_b", "_s"):
            self._add_direction(suffix)

    def _add_direction(self, suffix: str) -> None:
        """A direction's core, created in upstream's order. Upstream leaves these dt projections at PyTorch's default
        Linear initialisation (only the forward one gets Mamba's dt initialisation); so do we."""
        A = torch.arange(1, self.d_state + 1, dtype=torch.float32).repeat(self.d_inner, 1)
        setattr(self, f"A{suffix}_log", nn.Parameter(torch.log(A)))
        setattr(self, f"conv1d{suffix}", nn.Conv1d(self.d_inner, self.d_inner, self.d_conv, groups=self.d_inner,
                                                   padding=self.d_conv - 1))
        setattr(self, f"x_proj{suffix}", nn.Linear(self.d_inner, self.dt_rank + 2 * self.d_state, bias=False))
        setattr(self, f"dt_proj{suffix}", nn.Linear(self.dt_rank, self.d_inner))
        setattr(self, f"D{suffix}", nn.Parameter(torch.ones(self.d_inner)))
        getattr(self, f"A{suffix}_log")._no_weight_decay = True
        getattr(self, f"D{suffix}")._no_weight_decay = True

    def forward(self, hidden_states: Tensor, slices: int) -> Tensor:
        """tokens [batch, L, d_model] of a volume flattened slice-major (`slices` slices of L / slices tokens each)."""
        batch, length, _ = hidden_states.shape
        if length % slices:
            raise ValueError(f"TriOrientedMamba: {length} tokens do not make {slices} slices of equal length")
        self.last_backend = self.backend_for(hidden_states.device)
        out = self._direction(hidden_states, "")
        out = out + self._direction(hidden_states.flip(1), "_b").flip(1)
        return out + _deinterleave(self._direction(_interleave(hidden_states, slices), "_s"), slices)

    def _direction(self, tokens: Tensor, suffix: str) -> Tensor:
        """One direction's Mamba pass, [batch, L, d_model] -> [batch, L, d_model], with its core's weights."""
        conv1d, x_proj, dt_proj = (getattr(self, f"{name}{suffix}") for name in ("conv1d", "x_proj", "dt_proj"))
        A = -torch.exp(getattr(self, f"A{suffix}_log").float())
        D, dt_bias = getattr(self, f"D{suffix}").float(), dt_proj.bias.float()
        if self.last_backend == "cuda":
            from nnmamba.ssm_kernels import mamba_kernels_forward

            return mamba_kernels_forward(tokens, self.in_proj.weight, self.in_proj.bias,
                                         conv1d.weight.view(self.d_inner, self.d_conv), conv1d.bias, x_proj.weight,
                                         dt_proj.weight, A, D, dt_bias, self.out_proj.weight, self.out_proj.bias, 1)
        length = tokens.shape[1]
        x, z = self.in_proj(tokens).transpose(1, 2).chunk(2, dim=1)
        x = F.silu(conv1d(x)[..., :length])  # padding d_conv - 1 then truncation: a causal conv
        dt, B, C = torch.split(x_proj(x.transpose(1, 2)), [self.dt_rank, self.d_state, self.d_state], dim=-1)
        delta = F.linear(dt, dt_proj.weight).transpose(1, 2)  # the scan adds the bias, before its softplus
        y = selective_scan(x, delta, A, B.transpose(1, 2), C.transpose(1, 2), D, z=z, delta_bias=dt_bias,
                           delta_softplus=True)
        return self.out_proj(y.transpose(1, 2))


class ToMLayer(nn.Module):
    """SegMamba's Mamba layer: x + ToM(LayerNorm(x)) over the voxels of [B, C, D, H, W], the slices along D.

    Upstream fixes the slice count per stage ([64, 32, 16, 8]: the depth of each stage's map at its 128³ patch);
    here it is the depth of the map at hand, the same at that patch and still slices at any other.
    """

    def __init__(self, dim: int, **mamba_options: Any) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.mamba = TriOrientedMamba(dim, **mamba_options)

    def forward(self, x: Tensor) -> Tensor:
        tokens = x.flatten(2).transpose(1, 2)
        return x + self.mamba(self.norm(tokens), slices=x.shape[2]).transpose(1, 2).reshape(x.shape)


class GatedSpatialConv(nn.Module):
    """SegMamba's GSC: x + CNA1(CNA3(CNA3(x)) + CNA1(x)), conv-instance norm-ReLU blocks with 3³ and 1³ kernels; the
    two branches are summed, as upstream's code does."""

    def __init__(self, channels: int) -> None:
        super().__init__()

        def cna(kernel: int) -> nn.Module:
            return _monai_blocks().Convolution(3, channels, channels, kernel_size=kernel, norm="instance", act="relu")

        self.local = nn.Sequential(cna(3), cna(3))
        self.pointwise = cna(1)
        self.merge = cna(1)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.merge(self.local(x) + self.pointwise(x))


class MambaEncoder(nn.Module):
    """SegMamba's encoder: per stage a downsampling (the 7³ stride-2 stem, then instance norm + 2³ stride-2 convs),
    a GSC and `depth` ToM layers; each stage's output leaves through instance norm and a 1×1×1 MLP (GELU, 2×)."""

    def __init__(self, in_channels: int, features: Sequence[int], depths: Sequence[int], **mamba_options: Any) -> None:
        super().__init__()
        self.downsamples = nn.ModuleList([nn.Conv3d(in_channels, features[0], 7, 2, 3), *(
            nn.Sequential(nn.InstanceNorm3d(features[i]), nn.Conv3d(features[i], features[i + 1], 2, 2))
            for i in range(len(features) - 1))])
        self.gscs = nn.ModuleList(GatedSpatialConv(c) for c in features)
        self.stages = nn.ModuleList(nn.Sequential(*(ToMLayer(c, **mamba_options) for _ in range(depth)))
                                    for c, depth in zip(features, depths))
        self.outputs = nn.ModuleList(nn.Sequential(nn.InstanceNorm3d(c), nn.Conv3d(c, 2 * c, 1), nn.GELU(),
                                                   nn.Conv3d(2 * c, c, 1)) for c in features)

    def forward(self, x: Tensor) -> list[Tensor]:
        outputs = []
        for downsample, gsc, stage, output in zip(self.downsamples, self.gscs, self.stages, self.outputs):
            x = stage(gsc(downsample(x)))
            outputs.append(output(x))
        return outputs


class SegMamba(nn.Module):
    """SegMamba: the Mamba encoder's four scales (/2 ... /16) and the input itself, each through a MONAI UNETR
    residual block (the last to `hidden_size` channels), decoded by UNETR up-blocks, a refining block, a 1×1×1 head."""

    def __init__(self, in_channels: int, out_channels: int, depths: Sequence[int], feat_size: Sequence[int],
                 hidden_size: int, norm_name: str, **mamba_options: Any) -> None:
        super().__init__()
        self.mamba_encoder = MambaEncoder(in_channels, feat_size, depths, **mamba_options)
        widths = [in_channels, *feat_size]
        block = {"spatial_dims": 3, "kernel_size": 3, "norm_name": norm_name, "res_block": True}
        monai = _monai_blocks()
        self.encoders = nn.ModuleList(monai.UnetrBasicBlock(in_channels=c_in, out_channels=c_out, stride=1, **block)
                                      for c_in, c_out in zip(widths, [*feat_size, hidden_size]))
        self.decoders = nn.ModuleList(monai.UnetrUpBlock(in_channels=c_in, out_channels=c_out, upsample_kernel_size=2,
                                                         **block)
                                      for c_in, c_out in zip([hidden_size, *feat_size[:0:-1]], feat_size[::-1]))
        self.refine = monai.UnetrBasicBlock(in_channels=feat_size[0], out_channels=feat_size[0], stride=1, **block)
        self.out = monai.UnetOutBlock(spatial_dims=3, in_channels=feat_size[0], out_channels=out_channels)

    def forward(self, x: Tensor) -> Tensor:
        skips = [encoder(f) for encoder, f in zip(self.encoders, [x, *self.mamba_encoder(x)])]
        y = skips[-1]
        for decoder, skip in zip(self.decoders, skips[-2::-1]):
            y = decoder(y, skip)
        return self.out(self.refine(y))


def segmamba(in_channels: int, out_channels: int, input_shape: Sequence[int], depths: Sequence[int] = (2, 2, 2, 2),
             feat_size: Sequence[int] = (48, 96, 192, 384), hidden_size: int = 768, norm_name: str = "instance",
             d_state: int = 16, d_conv: int = 4, expand: int = 2, ssm_backend: str = "auto") -> nn.Module:
    """SegMamba as its BraTS 2023 training script builds it (depths 2, features 48-384, hidden 768); the input's
    every axis a multiple of 16."""
    if len(depths) != 4 or len(feat_size) != 4:
        raise ValueError(f"backbone segmamba has four encoder stages: depths and feat_size need 4 entries each, got "
                         f"{list(depths)} and {list(feat_size)}")
    return SegMamba(in_channels, out_channels, depths, feat_size, hidden_size, norm_name, d_state=d_state,
                    d_conv=d_conv, expand=expand, backend=ssm_backend)
