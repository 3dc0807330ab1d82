"""The competitor backbones of the paper's Tables 1-4, built from the libraries that maintain them.

nnMamba itself is the `nnmamba` backbone (its ablation variants are `nnmamba.models`'); nnU-Net is
`dynamic-network-architectures`' PlainConvUNet with the topology nnunetv2's planner derives from
the study's spacing and patch (its 3d_fullres configuration, deep supervision included); every
other backbone comes from MONAI, configured as its authors publish it unless `options` say
otherwise. A backbone that needs a particular input shape (divisibility by its total
downsampling, or one fixed size for the ViT-based ones) says so when built with another.

Not available, as no maintained package ships them: nnFormer, CoTr (segmentation), CRATE
(classification) and ViTPose (landmarks) exist only as research repositories; see
`UNAVAILABLE` for the reasons the report prints.
"""

from __future__ import annotations

import math
import types
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from nnmamba.mamba_peers import segmamba, umamba_bot, umamba_enc
from nnmamba.models import available_variants, build_model

NNMAMBA = "nnmamba"


@dataclass(frozen=True)
class Recipe:
    """The optimizer and loss a backbone's authors (or its library's reference tutorial) train it with."""

    optimizer: str
    lr: float
    weight_decay: float
    source: str
    momentum: float = 0.0
    nesterov: bool = False
    schedule: str = "constant"                  # nnmamba.engine.SCHEDULES
    loss: str = "dice_ce"                       # segmentation: nnmamba.losses.SEGMENTATION_LOSSES


_MONAI_BTCV = Recipe("adamw", 1e-4, 1e-5, "MONAI's BTCV tutorials (unetr_btcv, swin_unetr_btcv): AdamW 1e-4, wd 1e-5, "
                     "DiceCELoss")
_NNUNET_SGD = Recipe("sgd", 1e-2, 3e-5, "nnunetv2's nnUNetTrainer: SGD 1e-2, Nesterov momentum 0.99, wd 3e-5, "
                     "PolyLRScheduler (exponent 0.9), Dice + CE", momentum=0.99, nesterov=True, schedule="poly")
_SEGMAMBA_SGD = Recipe("sgd", 1e-2, 3e-5, "ge-xing/SegMamba 3_train.py: SGD 1e-2, Nesterov momentum 0.99, wd 3e-5, "
                       "poly schedule, CrossEntropyLoss alone", momentum=0.99, nesterov=True, schedule="poly",
                       loss="ce")
_MONAI_BRATS = Recipe("adam", 1e-4, 1e-5, "MONAI's brats_segmentation_3d tutorial: Adam 1e-4, wd 1e-5, DiceLoss (there "
                      "sigmoid over the BraTS regions; softmax over the labels here, as the network outputs labels)",
                      loss="dice")


@dataclass(frozen=True)
class Backbone:
    """A network a study can train in place of nnMamba.

    `build(in_channels, out_channels, input_shape, **options)`; `divisor`: every axis of the input
    must be a multiple of it; `bottleneck_voxels`: the fewest voxels the deepest feature map may have
    (instance norm needs two); `fixed_input`: the network is built for exactly one input shape (a
    sliding window then has to use that shape); `reference`: (parameters in millions, in_channels,
    out_channels, input_shape, options, source) of a published configuration, which the tests
    check our build against; `recipe`: its own training recipe, where one is published (else the
    study's shared optimizer trains it).
    """

    name: str
    task: str
    label: str
    source: str
    build: Callable[..., nn.Module]
    divisor: int
    bottleneck_voxels: int = 1
    fixed_input: bool = False
    reference: tuple[float, int, int, tuple[int, int, int], dict, str] | None = None
    recipe: Recipe | None = None
    needs_spacing: bool = False                 # built from the voxel spacing too (`spacing` option)

    def check_input(self, input_shape: Sequence[int]) -> None:
        """Stop with what would work when `input_shape` (the patch) does not suit the network."""
        bad = [size for size in input_shape if size % self.divisor]
        if bad:
            fitting = tuple(max(self.divisor, round(s / self.divisor) * self.divisor) for s in input_shape)
            raise ValueError(f"backbone {self.name} ({self.source}) downsamples by {self.divisor} along every axis, "
                             f"so the patch must be a multiple of {self.divisor} on each; got {tuple(input_shape)}: "
                             f"set train.patch_size to e.g. {fitting}")
        if math.prod(size // self.divisor for size in input_shape) < self.bottleneck_voxels:
            raise ValueError(f"backbone {self.name} ({self.source}) needs at least {self.bottleneck_voxels} voxels in "
                             f"its deepest feature map (the patch / {self.divisor} per axis); "
                             f"got {tuple(input_shape)}: double the patch along one axis")


def _monai() -> types.ModuleType:
    """monai.networks.nets, imported on first build: `import monai` loads all of MONAI (MLflow
    included) in about 2 s, which every stage that only reads params.yaml would pay."""
    from monai.networks import nets

    return nets


class DeepSupervised(nn.Module):
    """nnU-Net's decoder outputs: every resolution while training (deep supervision; the loss takes the
    list, full resolution first), the full resolution only in eval mode, as nnU-Net predicts."""

    def __init__(self, network: nn.Module):
        super().__init__()
        self.network = network

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        self.network.decoder.deep_supervision = self.training
        return self.network(x)


def nnunet_topology(backbone: str, input_shape: Sequence[int], spacing: Sequence[float]) -> tuple[list, list]:
    """Pooling and kernel sizes per stage from nnunetv2's planner (3d_fullres) for this spacing and patch: the
    topology of every backbone built on nnU-Net's (nnU-Net, U-Mamba); a patch it cannot pool says which would."""
    try:  # the [nnunet] extra: nnU-Net's packages are heavy, and only these backbones need them
        from nnunetv2.experiment_planning.experiment_planners.network_topology import get_pool_and_conv_props
    except ImportError as error:
        raise ImportError(f"backbone {backbone} needs nnU-Net's packages: pip install 'nnmamba[nnunet]' "
                          "(under a constraints file that pins your torch)") from error

    _, pools, kernels, fitted, divisible = get_pool_and_conv_props(list(spacing), list(input_shape), 4, 999999)
    if tuple(int(s) for s in fitted) != tuple(input_shape):
        raise ValueError(f"backbone {backbone}: nnU-Net's topology for spacing {tuple(spacing)} pools the patch by "
                         f"{tuple(int(d) for d in divisible)} per axis; got {tuple(input_shape)}: set "
                         f"train.patch_size to {tuple(int(s) for s in fitted)}")
    return pools, kernels


def _nnunet(in_channels: int, out_channels: int, input_shape: Sequence[int], spacing: Sequence[float],
            deep_supervision: bool = True, **options: Any) -> nn.Module:
    """nnU-Net's 3d_fullres PlainConvUNet: pooling and kernels per axis from nnunetv2's planner for this
    spacing and patch; 32 features doubling per stage up to 320, two convolutions per stage,
    instance norm, leaky ReLU."""
    pools, kernels = nnunet_topology("nnunet", input_shape, spacing)
    from dynamic_network_architectures.architectures.unet import PlainConvUNet  # installed with nnunetv2

    stages = len(pools)
    settings = {"features_per_stage": [min(32 * 2**i, 320) for i in range(stages)], "n_conv_per_stage": [2] * stages,
                "n_conv_per_stage_decoder": [2] * (stages - 1), "conv_bias": True, "norm_op": nn.InstanceNorm3d,
                "norm_op_kwargs": {"eps": 1e-5, "affine": True}, "nonlin": nn.LeakyReLU,
                "nonlin_kwargs": {"inplace": True}} | options
    network = PlainConvUNet(in_channels, stages, conv_op=nn.Conv3d, kernel_sizes=kernels, strides=pools,
                            num_classes=out_channels, deep_supervision=deep_supervision, **settings)
    return DeepSupervised(network) if deep_supervision else network


class LogitsOnly(nn.Module):
    """MONAI's classification ViT returns (logits, hidden states); the pipeline wants the logits."""

    def __init__(self, network: nn.Module):
        super().__init__()
        self.network = network

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.network(x)[0]


def _unetr(in_channels: int, out_channels: int, input_shape: Sequence[int], **options: Any) -> nn.Module:
    return _monai().UNETR(in_channels, out_channels, img_size=tuple(input_shape), **options)


def _swinunetr(in_channels: int, out_channels: int, input_shape: Sequence[int], **options: Any) -> nn.Module:
    return _monai().SwinUNETR(in_channels=in_channels, out_channels=out_channels, **({"feature_size": 48} | options))


def _vnet(in_channels: int, out_channels: int, input_shape: Sequence[int], **options: Any) -> nn.Module:
    if 16 % in_channels:
        raise ValueError(f"backbone vnet (monai.networks.nets.VNet) needs 16 divisible by the number of input "
                         f"channels; got {in_channels}")
    return _monai().VNet(spatial_dims=3, in_channels=in_channels, out_channels=out_channels, **options)


def _segresnet(in_channels: int, out_channels: int, input_shape: Sequence[int], **options: Any) -> nn.Module:
    return _monai().SegResNet(spatial_dims=3, in_channels=in_channels, out_channels=out_channels, **options)


def _resunet(in_channels: int, out_channels: int, input_shape: Sequence[int], **options: Any) -> nn.Module:
    """MONAI's residual UNet (the paper's ResUNet baseline for landmarks), heatmaps out."""
    settings = {"channels": (16, 32, 64, 128, 256), "strides": (2, 2, 2, 2), "num_res_units": 2} | options
    return _monai().UNet(spatial_dims=3, in_channels=in_channels, out_channels=out_channels, **settings)


def _resnet(in_channels: int, out_channels: int, input_shape: Sequence[int], **options: Any) -> nn.Module:
    depth = options.pop("depth", 18)
    return getattr(_monai(), f"resnet{depth}")(spatial_dims=3, n_input_channels=in_channels, num_classes=out_channels,
                                               **options)


def _densenet(in_channels: int, out_channels: int, input_shape: Sequence[int], **options: Any) -> nn.Module:
    return _monai().DenseNet121(spatial_dims=3, in_channels=in_channels, out_channels=out_channels, **options)


def _vit(in_channels: int, out_channels: int, input_shape: Sequence[int], **options: Any) -> nn.Module:
    settings = {"patch_size": 16} | options
    return LogitsOnly(_monai().ViT(in_channels, img_size=tuple(input_shape), classification=True,
                               num_classes=out_channels, post_activation=None, **settings))


_PAPER_AMOS = "paper Table 2 (AMOS, 1 channel, 16 classes)"
# No published parameter count of these two was found (SegMamba's authors did not count it: ge-xing/SegMamba
# issue #19): the references are counted by hand, layer by layer, from the original code.
_UMAMBA_COUNTED = ("counted from the code, no published figure found: bowang-lab/U-Mamba umamba/nnunetv2/nets/{file} "
                   "(get_umamba_{builder}_3d_from_plans) on nnunetv2's 3d_fullres plan for a 1-channel 128^3 patch at "
                   "1 mm, 16 classes: 6 stages, 32-320 features, 2 convs per stage")
_SEGMAMBA_COUNTED = ("counted from the code, no published figure found: ge-xing/SegMamba model_segmamba/segmamba.py "
                     "with its mamba_simple.py bimamba v3, SegMamba(in_chans=4, out_chans=4, depths=[2,2,2,2], "
                     "feat_size=[48,96,192,384]) as its 3_train.py builds it for BraTS 2023 (128^3 patches)")
BACKBONES: dict[str, dict[str, Backbone]] = {
    "segmentation": {
        "nnunet": Backbone("nnunet", "segmentation", "nnU-Net",
                           "dynamic_network_architectures PlainConvUNet, nnunetv2 3d_fullres topology", _nnunet, 1,
                           reference=(31.18, 1, 16, (128, 128, 128), {"spacing": (1.0, 1.0, 1.0)}, _PAPER_AMOS),
                           needs_spacing=True, recipe=_NNUNET_SGD),
        "unetr": Backbone("unetr", "segmentation", "UNETR", "monai.networks.nets.UNETR", _unetr, 16, fixed_input=True,
                          reference=(93.02, 1, 16, (96, 96, 96), {}, _PAPER_AMOS), recipe=_MONAI_BTCV),
        "swinunetr": Backbone("swinunetr", "segmentation", "SwinUNETR", "monai.networks.nets.SwinUNETR", _swinunetr,
                              32, bottleneck_voxels=2, reference=(62.83, 1, 16, (96, 96, 96), {}, _PAPER_AMOS),
                              recipe=_MONAI_BTCV),
        "vnet": Backbone("vnet", "segmentation", "VNet", "monai.networks.nets.VNet", _vnet, 16,
                         reference=(45.65, 1, 16, (96, 96, 96), {}, _PAPER_AMOS)),
        "segresnet": Backbone("segresnet", "segmentation", "SegResNet", "monai.networks.nets.SegResNet", _segresnet,
                              8, recipe=_MONAI_BRATS),
        "umamba_bot": Backbone("umamba_bot", "segmentation", "U-Mamba Bot",
                               "nnmamba.mamba_peers, after bowang-lab/U-Mamba UMambaBot_3d", umamba_bot, 1,
                               reference=(42.13, 1, 16, (128, 128, 128), {"spacing": (1.0, 1.0, 1.0)},
                                          _UMAMBA_COUNTED.format(file="UMambaBot_3d.py", builder="bot")),
                               needs_spacing=True, recipe=_NNUNET_SGD),
        "umamba_enc": Backbone("umamba_enc", "segmentation", "U-Mamba Enc",
                               "nnmamba.mamba_peers, after bowang-lab/U-Mamba UMambaEnc_3d", umamba_enc, 1,
                               fixed_input=True,
                               reference=(42.76, 1, 16, (128, 128, 128), {"spacing": (1.0, 1.0, 1.0)},
                                          _UMAMBA_COUNTED.format(file="UMambaEnc_3d.py", builder="enc")),
                               needs_spacing=True, recipe=_NNUNET_SGD),
        "segmamba": Backbone("segmamba", "segmentation", "SegMamba",
                             "nnmamba.mamba_peers, after ge-xing/SegMamba model_segmamba/segmamba.py", segmamba, 16,
                             bottleneck_voxels=2, reference=(67.42, 4, 4, (128, 128, 128), {}, _SEGMAMBA_COUNTED),
                             recipe=_SEGMAMBA_SGD),
    },
    "landmark": {
        "resunet": Backbone("resunet", "landmark", "ResUNet", "monai.networks.nets.UNet (residual units)", _resunet,
                            16, bottleneck_voxels=2),
    },
    "classification": {
        "resnet": Backbone("resnet", "classification", "ResNet", "monai.networks.nets.resnet18", _resnet, 1),
        "densenet": Backbone("densenet", "classification", "DenseNet", "monai.networks.nets.DenseNet121",
                             _densenet, 1),
        "vit": Backbone("vit", "classification", "ViT", "monai.networks.nets.ViT", _vit, 16, fixed_input=True),
    },
}

UNAVAILABLE = {
    "nnformer": "no maintained package: only the authors' research repository (282857341/nnFormer)",
    "cotr": "no maintained package: only the authors' research repository (YtongXie/CoTr), with its own CUDA "
            "deformable-attention build",
    "crate": "no maintained package of the 3D classifier: only research code (Ma-Lab-Berkeley/CRATE, 2D)",
    "vitpose": "no maintained package of a 3D landmark ViTPose: only 2D human-pose code (ViTAE-Transformer/ViTPose)",
}


def available_backbones(task: str) -> tuple[str, ...]:
    """`nnmamba` first, then the task's competitors in the order of the paper's tables."""
    return (NNMAMBA, *BACKBONES.get(task, {}))


def get_backbone(task: str, name: str) -> Backbone:
    """The competitor `name` of `task`; a clear error names the known ones and why some are missing."""
    if name in UNAVAILABLE:
        raise ValueError(f"backbone {name!r} is not available: {UNAVAILABLE[name]}")
    known = BACKBONES.get(task, {})
    if name not in known:
        raise ValueError(f"unknown backbone {name!r} for task {task!r}; known: {list(available_backbones(task))}")
    return known[name]


def build_network(task: str, backbone: str, variant: str | None, in_channels: int, out_channels: int,
                  input_shape: Sequence[int], **options: Any) -> nn.Module:
    """nnMamba's `variant`, or a competitor backbone with its own `options`, for inputs of `input_shape`."""
    if backbone == NNMAMBA:
        if variant not in available_variants(task):
            raise ValueError(f"nnmamba needs one of the variants {list(available_variants(task))}; got {variant!r}")
        return build_model(task, variant, in_channels, out_channels, **options)
    spec = get_backbone(task, backbone)
    spec.check_input(input_shape)
    return spec.build(in_channels, out_channels, tuple(input_shape), **options)

