"""Multiply-add counting against hand-computed values."""

from torch import nn

from nnmamba.complexity import count_macs
from nnmamba.models import build_model


def test_conv_and_linear_macs_match_hand_counts():
    conv = nn.Conv3d(2, 4, kernel_size=3, padding=1, bias=False)
    assert count_macs(conv, (1, 2, 8, 8, 8)) == 8**3 * 4 * 2 * 27
    linear = nn.Linear(10, 3)
    assert count_macs(linear, (5, 10)) == 5 * 10 * 3


def test_ssm_variants_cost_more_than_the_baseline():
    shape = (1, 1, 32, 32, 32)
    macs = {v: count_macs(build_model("segmentation", v, 1, 2, base_channels=4), shape)
            for v in ("baseline", "mic", "miccss")}
    assert macs["baseline"] < macs["mic"] < macs["miccss"]
    assert count_macs(build_model("segmentation", "baseline", 1, 2, base_channels=4), (2, 1, 32, 32, 32)) == 2 * macs["baseline"]
