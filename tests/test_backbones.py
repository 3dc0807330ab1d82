"""The competitor backbones: built from MONAI as published, trainable, and bundled like nnMamba."""

from __future__ import annotations

import json

import pytest
import torch

from nnmamba.backbones import BACKBONES, NNMAMBA, UNAVAILABLE, available_backbones, build_network, get_backbone
from nnmamba.checkpoint import load_bundle, save_bundle
from nnmamba.complexity import count_macs
from nnmamba.losses import build_loss
from nnmamba.models import count_parameters

# Small enough for a CPU step: (in, out channels, input shape, options) per backbone.
TINY = {
    "nnunet": (2, 3, (32, 32, 16), {"spacing": (1.0, 1.0, 2.0)}),
    "unetr": (2, 3, (16, 16, 16), {"feature_size": 8, "hidden_size": 48, "mlp_dim": 96, "num_heads": 4}),
    "swinunetr": (2, 3, (64, 32, 32), {"feature_size": 12, "depths": (1, 1, 1, 1)}),
    "vnet": (2, 3, (16, 16, 16), {}),
    "segresnet": (2, 3, (16, 16, 16), {"init_filters": 8}),
    "umamba_bot": (2, 3, (32, 32, 16), {"spacing": (1.0, 1.0, 2.0), "base_features": 4, "max_features": 16}),
    "umamba_enc": (2, 3, (32, 32, 16), {"spacing": (1.0, 1.0, 2.0), "base_features": 8, "max_features": 64}),
    "segmamba": (2, 3, (32, 32, 16), {"feat_size": (4, 8, 16, 32), "hidden_size": 32, "depths": (1, 1, 1, 1)}),
    "resunet": (1, 6, (32, 16, 16), {"channels": (4, 8, 16, 32, 64)}),
    "resnet": (1, 2, (16, 16, 16), {}),
    "densenet": (1, 2, (32, 32, 32), {"init_features": 8, "growth_rate": 4, "block_config": (1, 1, 1, 1)}),
    "vit": (1, 2, (16, 16, 16), {"hidden_size": 48, "mlp_dim": 96, "num_heads": 4, "num_layers": 2}),
}
CASES = [(task, name) for task, backbones in BACKBONES.items() for name in backbones]


def target(task: str, out_channels: int, shape: tuple[int, ...]) -> torch.Tensor:
    if task == "segmentation":
        return torch.randint(0, out_channels, (2, 1, *shape))
    if task == "landmark":
        return torch.rand(2, out_channels, *shape)
    return torch.tensor([0, 1])


def test_every_backbone_of_the_registry_has_a_tiny_configuration():
    assert sorted(name for _, name in CASES) == sorted(TINY)


@pytest.mark.parametrize(("task", "name"), CASES)
def test_backbone_trains_a_step_and_round_trips_through_its_bundle(task, name, tmp_path):
    in_channels, out_channels, shape, options = TINY[name]
    torch.manual_seed(0)
    model = build_network(task, name, None, in_channels, out_channels, shape, **options)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    x = torch.randn(2, in_channels, *shape)
    loss = build_loss(task, **({"foreground_weight": 10} if task == "landmark" else {}))(model(x), target(task, out_channels, shape))
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    optimizer.step()

    arch = {"task": task, "backbone": name, "variant": None, "in_channels": in_channels, "out_channels": out_channels,
            "input_shape": list(shape), "kwargs": options}
    save_bundle(tmp_path, arch, model.state_dict())
    loaded, loaded_arch = load_bundle(tmp_path)
    model.eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert loaded_arch == json.loads(json.dumps(arch))


@pytest.mark.parametrize(("task", "name"), [(t, n) for t, n in CASES if BACKBONES[t][n].reference])
def test_parameter_counts_match_the_published_configurations_within_3_percent(task, name):
    millions, in_channels, out_channels, shape, options, source = BACKBONES[task][name].reference
    model = build_network(task, name, None, in_channels, out_channels, shape, **options)
    assert count_parameters(model) / 1e6 == pytest.approx(millions, rel=0.03), source


def test_macs_on_the_meta_device_match_the_papers_table_2():
    """VNet 849.96 and UNETR 177.51 GFLOPs (multiply-adds) at 1 x 128^3, 1 channel in, 16 classes out."""
    for name, paper in (("vnet", 849.96), ("unetr", 177.51)):
        model = build_network("segmentation", name, None, 1, 16, (128, 128, 128)).to("meta")
        assert count_macs(model, (1, 1, 128, 128, 128)) / 1e9 == pytest.approx(paper, rel=0.01)


def test_a_patch_the_backbone_cannot_take_names_the_constraint_and_a_fitting_patch():
    with pytest.raises(ValueError, match=r"swinunetr .* multiple of 32 .* got \(48, 64, 40\): set "
                                         r"train.patch_size to e.g. \(64, 64, 32\)"):
        build_network("segmentation", "swinunetr", None, 1, 2, (48, 64, 40))
    with pytest.raises(ValueError, match=r"at least 2 voxels in its deepest feature map .* got \(32, 32, 32\)"):
        build_network("segmentation", "swinunetr", None, 1, 2, (32, 32, 32))
    with pytest.raises(ValueError, match="16 divisible by the number of input channels; got 3"):
        build_network("segmentation", "vnet", None, 3, 2, (16, 16, 16))


def test_nnunet_follows_nnunets_planner_and_trains_with_deep_supervision():
    """Anisotropic spacing: nnunetv2 pools the coarse axis later; training returns every decoder output
    and the loss weights them, evaluation returns the full resolution only."""
    model = build_network("segmentation", "nnunet", None, 1, 3, (64, 64, 16), spacing=(0.8, 0.8, 3.0))
    strides = [tuple(stage[0].convs[0].conv.stride) for stage in model.network.encoder.stages]
    assert strides[:3] == [(1, 1, 1), (2, 2, 1), (2, 2, 2)]
    x = torch.randn(2, 1, 64, 64, 16)
    outputs = model(x)
    assert [tuple(o.shape[2:]) for o in outputs][:2] == [(64, 64, 16), (32, 32, 16)]
    target = torch.randint(0, 3, (2, 1, 64, 64, 16))
    full_only = build_loss("segmentation").loss(outputs[0], target)
    assert build_loss("segmentation")(outputs, target) != full_only  # the lower resolutions count too
    model.eval()
    assert model(x).shape == (2, 3, 64, 64, 16)
    with pytest.raises(ValueError, match=r"nnU-Net's topology .* set train.patch_size to"):
        build_network("segmentation", "nnunet", None, 1, 3, (60, 64, 16), spacing=(0.8, 0.8, 3.0))


def test_unknown_and_unavailable_backbones_say_so():
    assert available_backbones("segmentation")[0] == NNMAMBA
    with pytest.raises(ValueError, match="unknown backbone 'unet' for task 'segmentation'; known: .*'segresnet'"):
        get_backbone("segmentation", "unet")
    for name, reason in UNAVAILABLE.items():
        with pytest.raises(ValueError, match=f"backbone '{name}' is not available: no maintained package"):
            get_backbone("segmentation", name)
        assert "repository" in reason or "research code" in reason or "2D" in reason
