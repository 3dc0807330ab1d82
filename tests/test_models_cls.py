"""nnMambaCls: shapes, the ablation registry, and the channel-sequential tokens against brute-force pooling."""

import pytest
import torch

from nnmamba.blocks import MambaInConv
from nnmamba.models import NnMambaCls, available_variants, build_model, count_parameters
from nnmamba.ssm import Mamba

VARIANTS = ("baseline", "miccss", "sequence")


@pytest.mark.parametrize("variant", VARIANTS)
def test_variants_give_one_logit_per_class_for_any_volume_size(variant):
    torch.manual_seed(0)
    net = build_model("classification", variant, in_channels=1, out_channels=3, base_channels=4, blocks_per_stage=2)
    out = net(torch.randn(2, 1, 16, 24, 20))
    assert out.shape == (2, 3)
    out.sum().backward()
    assert all(p.grad is not None for p in net.parameters() if p.requires_grad)


def test_registry_lists_the_papers_classification_ablation():
    assert available_variants("classification") == VARIANTS
    with pytest.raises(ValueError, match="unknown variant 'mic' for task 'classification'"):
        build_model("classification", "mic", 1, 2)


def test_variants_differ_exactly_by_stem_miccss_and_sequence_mamba():
    kwargs = dict(in_channels=1, out_channels=2, base_channels=8, blocks_per_stage=2, d_state=8)
    baseline, miccss, sequence = (build_model("classification", v, **kwargs) for v in VARIANTS)
    assert baseline.stem_global is None and baseline.sequence is None
    assert isinstance(miccss.stem_global, MambaInConv) and miccss.sequence is None
    stem = sum(p.numel() for p in miccss.stem_global.parameters())
    assert count_parameters(miccss) == count_parameters(baseline) + stem
    # The sequence head: a Mamba over 2C-wide tokens, and an MLP reading 7 tokens instead of the 8C pool.
    assert isinstance(sequence.sequence, Mamba) and sequence.sequence.d_model == 16
    assert sequence.sequence.d_state == 8 and sequence.sequence.d_conv == 2
    mamba = sum(p.numel() for p in sequence.sequence.parameters())
    wider_mlp_input = (7 * 16 - 64) * 8  # first Linear: in 14C instead of 8C, out C = 8
    assert count_parameters(sequence) == count_parameters(miccss) + mamba + wider_mlp_input


def test_channel_sequence_matches_brute_force_pooling():
    """Token t of a stage with k tokens = spatial mean of channels t, t+k, t+2k, ... (stages 2, 3, 4)."""
    torch.manual_seed(0)
    net = NnMambaCls(1, 2, variant="sequence", base_channels=2)
    batch, width = 3, 4  # token width 2C
    stages = [torch.randn(batch, width * k, 5 - k, 4, 3 + k, dtype=torch.float64) for k in (1, 2, 4)]
    tokens = net.channel_sequence(stages)
    assert tokens.shape == (batch, 7, width)
    expected = torch.empty(batch, 7, width, dtype=torch.float64)
    position = 0
    for features, k in zip(stages, (1, 2, 4)):
        for t in range(k):
            for j in range(width):
                for b in range(batch):
                    expected[b, position, j] = features[b, j * k + t].mean()
            position += 1
    torch.testing.assert_close(tokens, expected)


def test_sequence_head_is_a_residual_mamba_over_the_tokens():
    """With the Mamba's output projection zeroed, the head sees the pooled tokens themselves."""
    torch.manual_seed(0)
    net = NnMambaCls(1, 2, variant="sequence", base_channels=4, blocks_per_stage=1).eval()
    torch.nn.init.zeros_(net.sequence.out_proj.weight)
    x = torch.randn(2, 1, 16, 16, 16)
    out = net.stem(x)
    out = out + net.stem_global(out)
    stages = []
    for stage in net.encoder:
        out = stage(out)
        stages.append(out)
    expected = net.mlp(net.channel_sequence(stages).flatten(1))
    torch.testing.assert_close(net(x), expected)


def test_unknown_variant_is_refused():
    with pytest.raises(ValueError, match="unknown classification variant"):
        NnMambaCls(1, 2, variant="mic")
