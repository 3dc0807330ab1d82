"""The nnMamba networks: shapes, the ablation registry, and CSS against its four-call definition."""

import pytest
import torch

from nnmamba.blocks import ChannelSpatialSiamese, MambaInConv
from nnmamba.models import NnMambaSeg, available_variants, build_model, count_parameters
from nnmamba.ssm import Mamba


@pytest.mark.parametrize("variant", ["baseline", "mic", "miccss"])
def test_dense_variants_predict_one_map_per_class(variant):
    torch.manual_seed(0)
    net = build_model("segmentation", variant, in_channels=4, out_channels=3, base_channels=4, blocks_per_stage=2)
    out = net(torch.randn(2, 4, 32, 16, 48))
    assert out.shape == (2, 3, 32, 16, 48)
    out.mean().backward()
    assert all(p.grad is not None for p in net.parameters() if p.requires_grad)


def test_variants_differ_exactly_by_their_ssm_branches():
    kwargs = dict(in_channels=1, out_channels=16, base_channels=32)
    baseline, mic, miccss = (build_model("segmentation", v, **kwargs) for v in ("baseline", "mic", "miccss"))
    ssm_params = sum(p.numel() for m in mic.modules() if isinstance(m, MambaInConv) for p in m.parameters())
    assert count_parameters(mic) == count_parameters(baseline) + ssm_params
    # CSS shares the SSM across its four views: no extra parameters.
    assert count_parameters(miccss) == count_parameters(mic)
    assert not any(isinstance(m, MambaInConv) for m in baseline.modules())


def test_non_first_blocks_of_a_stage_share_one_global_branch():
    net = build_model("segmentation", "mic", 1, 2, base_channels=4, blocks_per_stage=3)
    for stage in net.encoder:
        first, *rest = stage
        assert first.global_branch is None
        assert all(block.global_branch is rest[0].global_branch for block in rest)


@pytest.mark.parametrize("bias", [False, True])
def test_batched_css_equals_four_separate_ssm_calls(bias):
    """Outputs and every parameter gradient; with biases the flipped projections' biases are exercised."""
    torch.manual_seed(0)
    ssm = Mamba(6, d_state=4, bias=bias, backend="torch").double()
    with torch.no_grad():
        for name, param in ssm.named_parameters():
            if name in ("in_proj.bias", "out_proj.bias"):
                param.normal_()
    css = ChannelSpatialSiamese(ssm)
    tokens = torch.randn(3, 17, 6, dtype=torch.float64)
    weights = torch.randn(3, 17, 6, dtype=torch.float64)
    reference = (
        ssm(tokens)
        + ssm(tokens.flip(1)).flip(1)
        + ssm(tokens.flip(2)).flip(2)
        + ssm(tokens.flip(1, 2)).flip(1, 2)
    ) / 4
    reference_grads = torch.autograd.grad((reference * weights).sum(), list(ssm.parameters()))
    out = css(tokens)
    grads = torch.autograd.grad((out * weights).sum(), list(ssm.parameters()))
    torch.testing.assert_close(out, reference)
    for (name, _), grad, reference_grad in zip(ssm.named_parameters(), grads, reference_grads):
        torch.testing.assert_close(grad, reference_grad, msg=name)


def test_mic_sees_the_volume_as_a_voxel_sequence():
    """A pointwise SSM stand-in makes MIC a per-voxel map: flatten/unflatten must not scramble voxels."""
    torch.manual_seed(0)
    mic = MambaInConv(3, torch.nn.Identity(), siamese=False).eval()
    x = torch.randn(2, 3, 4, 5, 6)
    features = mic.conv_in(x)
    torch.testing.assert_close(mic(x), mic.conv_out(2 * features))


def test_registry_lists_variants_and_rejects_unknown_names():
    assert available_variants("segmentation") == ("baseline", "mic", "miccss")
    assert available_variants("landmark") == ("baseline", "mic", "miccss")
    with pytest.raises(ValueError, match="unknown task"):
        build_model("detection", "mic", 1, 1)
    with pytest.raises(ValueError, match="unknown variant 'css'"):
        build_model("segmentation", "css", 1, 1)


def test_input_not_divisible_by_16_is_refused():
    net = NnMambaSeg(1, 2, variant="baseline", base_channels=4)
    with pytest.raises(ValueError, match="divisible by 16"):
        net(torch.randn(1, 1, 32, 32, 24))


def test_channels_last_input_gives_the_same_output():
    torch.manual_seed(0)
    net = build_model("segmentation", "miccss", 2, 3, base_channels=4, blocks_per_stage=2).eval()
    x = torch.randn(1, 2, 32, 32, 32)
    expected = net(x)
    net = net.to(memory_format=torch.channels_last_3d)
    torch.testing.assert_close(net(x.contiguous(memory_format=torch.channels_last_3d)), expected,
                               rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("task, variant", [("segmentation", "miccss"), ("classification", "sequence")])
def test_input_already_in_the_autocast_dtype_gives_the_same_output(task, variant):
    """Why the training loader may hand over bf16 images: the first convolution casts its input to bf16 anyway."""
    torch.manual_seed(0)
    net = build_model(task, variant, 2, 3, base_channels=4, blocks_per_stage=2).eval()
    x = torch.randn(1, 2, 32, 32, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(net(x.to(torch.bfloat16)), net(x))
