"""U-Mamba (Bot, Enc) and SegMamba on nnmamba's Mamba block: shapes, a training step, parameter counts against the
original code, and SegMamba's tri-oriented Mamba against three directional scans written as upstream computes them."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from nnmamba.backbones import BACKBONES, build_network, get_backbone
from nnmamba.checkpoint import save_bundle
from nnmamba.losses import build_loss
from nnmamba.mamba_peers import TriOrientedMamba, VoxelMamba
from nnmamba.models import count_parameters
from nnmamba.predict import find_input_cases, predict_cases
from nnmamba.ssm import Mamba, selective_scan_sequential
from tests.conftest import REPO, same_geometry
from tests.test_predict import _record, mha_inputs  # noqa: F401  (mha_inputs: a fixture)

PEERS = ("umamba_bot", "umamba_enc", "segmamba")
# (in, out channels, input shape, options): seconds on a CPU. The Enc one has a channel-token stage (4³ = 64 voxels
# for 64 channels at the bottleneck).
TINY = {
    "umamba_bot": (2, 3, (32, 32, 16), {"spacing": (1.0, 1.0, 2.0), "base_features": 4, "max_features": 16}),
    "umamba_enc": (2, 3, (32, 32, 16), {"spacing": (1.0, 1.0, 2.0), "base_features": 8, "max_features": 64}),
    "segmamba": (2, 3, (32, 32, 16), {"feat_size": (4, 8, 16, 32), "hidden_size": 32, "depths": (1, 1, 1, 1)}),
}


def _mambas(model: torch.nn.Module) -> list[Mamba]:
    return [m for m in model.modules() if isinstance(m, Mamba)]


@pytest.mark.parametrize("name", PEERS)
def test_peer_trains_a_step_and_predicts_full_resolution_logits_on_the_torch_scan(name):
    in_channels, out_channels, shape, options = TINY[name]
    torch.manual_seed(0)
    model = build_network("segmentation", name, None, in_channels, out_channels, shape, **options)
    x = torch.randn(2, in_channels, *shape)
    before = [p.detach().clone() for p in model.parameters()]
    loss = build_loss("segmentation")(model(x), torch.randint(0, out_channels, (2, 1, *shape)))
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    torch.optim.Adam(model.parameters(), lr=1e-3).step()
    assert all(not torch.equal(b, p) for b, p in zip(before, model.parameters()))  # every weight moved
    assert {m.last_backend for m in _mambas(model)} == {"torch"}
    model.eval()
    with torch.no_grad():
        assert model(x).shape == (2, out_channels, *shape)


@pytest.mark.parametrize("name", PEERS)
def test_parameter_count_is_the_one_counted_from_the_original_code(name):
    """The references are hand counts of upstream's layers; ours equals them to their rounding (0.005 M)."""
    millions, in_channels, out_channels, shape, options, source = BACKBONES["segmentation"][name].reference
    assert "counted from the code" in source
    with torch.device("meta"):
        model = build_network("segmentation", name, None, in_channels, out_channels, shape, **options)
    assert count_parameters(model) / 1e6 == pytest.approx(millions, abs=0.005), source


# Upstream's bimamba "v3" Mamba (ge-xing/SegMamba, mamba/mamba_ssm/modules/mamba_simple.py), d_model 32: its
# parameters in creation order, d_inner 64, dt_rank 2, d_state 16.
UPSTREAM_V3 = {"A_log": (64, 16), "A_b_log": (64, 16), "A_s_log": (64, 16), "D": (64,), "D_b": (64,), "D_s": (64,),
               "in_proj.weight": (128, 32), "out_proj.weight": (32, 64)} | {
    f"{name}{suffix}.{tensor}": shape for suffix in ("", "_b", "_s") for name, tensor, shape in (
        ("conv1d", "weight", (64, 1, 4)), ("conv1d", "bias", (64,)), ("x_proj", "weight", (34, 64)),
        ("dt_proj", "weight", (64, 2)), ("dt_proj", "bias", (64,)))}


def test_tri_oriented_mamba_has_the_parameters_of_upstreams_bimamba_v3():
    mixer = TriOrientedMamba(32)
    assert {k: tuple(v.shape) for k, v in mixer.state_dict().items()} == UPSTREAM_V3
    assert all(getattr(mixer, f"{p}")._no_weight_decay for p in ("A_log", "A_b_log", "A_s_log", "D", "D_b", "D_s"))


def _upstream_direction(mixer: TriOrientedMamba, xz: torch.Tensor, suffix: str) -> torch.Tensor:
    """mamba_inner_fn_no_out_proj of one direction, one step per position (selective_scan_sequential)."""
    conv1d, x_proj, dt_proj = (getattr(mixer, f"{n}{suffix}") for n in ("conv1d", "x_proj", "dt_proj"))
    x, z = xz.chunk(2, dim=1)
    x = F.conv1d(x, conv1d.weight, conv1d.bias, padding=mixer.d_conv - 1, groups=mixer.d_inner)
    x = F.silu(x[..., :xz.shape[-1]])
    x_dbl = torch.einsum("ed,bdl->bel", x_proj.weight, x)
    dt, B, C = torch.split(x_dbl, [mixer.dt_rank, mixer.d_state, mixer.d_state], dim=1)
    delta = torch.einsum("dr,brl->bdl", dt_proj.weight, dt)
    A = -torch.exp(getattr(mixer, f"A{suffix}_log"))
    return selective_scan_sequential(x, delta, A, B, C, getattr(mixer, f"D{suffix}"), z=z, delta_bias=dt_proj.bias,
                                     delta_softplus=True)


def _upstream_v3(mixer: TriOrientedMamba, hidden: torch.Tensor, slices: int) -> torch.Tensor:
    """Upstream's v3 forward as written there: xz once; flipped for "_b"; cut into `slices` chunks, stacked and
    flattened (interleaved) for "_s", its output reshaped and permuted back; one out projection of the sum."""
    batch, length, _ = hidden.shape
    xz = torch.einsum("ed,bld->bel", mixer.in_proj.weight, hidden)
    out = _upstream_direction(mixer, xz, "")
    out_b = _upstream_direction(mixer, xz.flip(-1), "_b").flip(-1)
    xz_s = torch.stack(xz.chunk(slices, dim=-1), dim=-1).flatten(-2)
    out_s = _upstream_direction(mixer, xz_s, "_s")
    out_s = out_s.reshape(batch, mixer.d_inner, length // slices, slices).permute(0, 1, 3, 2).flatten(-2)
    return F.linear((out + out_b + out_s).transpose(1, 2), mixer.out_proj.weight)


def test_tri_oriented_mamba_equals_three_directional_scans_written_as_upstream():
    torch.manual_seed(0)
    mixer = TriOrientedMamba(8, d_state=4, backend="torch").double()
    for suffix in ("", "_b", "_s"):  # distinct directions, so a swapped or mis-ordered one shows
        with torch.no_grad():
            getattr(mixer, f"A{suffix}_log").add_(torch.rand_like(getattr(mixer, f"A{suffix}_log")))
    hidden = torch.randn(2, 4 * 3 * 2, 8, dtype=torch.float64, requires_grad=True)  # 4 slices of 3x2 tokens
    ours = mixer(hidden, slices=4)
    reference = _upstream_v3(mixer, hidden, slices=4)
    torch.testing.assert_close(ours, reference, rtol=1e-10, atol=1e-10)
    assert mixer.last_backend == "torch"
    weights = torch.randn_like(ours)
    grads = torch.autograd.grad((ours * weights).sum(), [hidden, mixer.A_s_log, mixer.conv1d_b.weight])
    expected = torch.autograd.grad((reference * weights).sum(), [hidden, mixer.A_s_log, mixer.conv1d_b.weight])
    for grad, want in zip(grads, expected):
        torch.testing.assert_close(grad, want, rtol=1e-6, atol=1e-8)
    with pytest.raises(ValueError, match="24 tokens do not make 5 slices"):
        mixer(hidden, slices=5)


def test_segmamba_scans_slices_along_depth_and_downsamples_by_16():
    """Upstream's slice counts [64, 32, 16, 8] are the depths of its maps at 128³; ours follow the map."""
    _, _, _, options = TINY["segmamba"]
    model = build_network("segmentation", "segmamba", None, 1, 2, (64, 32, 16), **options)
    seen = []
    for mixer in (m for m in model.modules() if isinstance(m, TriOrientedMamba)):
        mixer.register_forward_pre_hook(lambda _, args, kwargs: seen.append(kwargs["slices"]), with_kwargs=True)
    assert model(torch.randn(1, 1, 64, 32, 16)).shape == (1, 2, 64, 32, 16)
    assert seen == [32, 16, 8, 4]
    with pytest.raises(ValueError, match=r"segmamba .* multiple of 16 .* got \(64, 32, 24\)"):
        build_network("segmentation", "segmamba", None, 1, 2, (64, 32, 24), **options)
    with pytest.raises(ValueError, match=r"at least 2 voxels in its deepest feature map"):
        get_backbone("segmentation", "segmamba").check_input((16, 16, 16))


def test_umamba_takes_nnunets_plan_and_lightens_half_its_stages_as_upstream():
    """At 128³, 1 mm: 6 stages pooled (1, 2, 2, 2, 2, 2), 2 blocks in the first three encoder stages and the three
    lowest decoder stages, 1 elsewhere; Bot mixes the bottleneck only, Enc every stage, over the channels where
    a stage has no more voxels than channels (4³ = 64 <= 320)."""
    with torch.device("meta"):
        bot, enc = (build_network("segmentation", name, None, 1, 16, (128, 128, 128), spacing=(1.0, 1.0, 1.0)).network
                    for name in ("umamba_bot", "umamba_enc"))
    assert [tuple(stage[0].conv1.stride) for stage in bot.stages] == [(1, 1, 1)] + [(2, 2, 2)] * 5
    assert [len(stage) for stage in bot.stages] == [2, 2, 2, 1, 1, 1]
    assert [len(stage) for stage in bot.decoder.stages] == [2, 2, 2, 1, 1]
    assert [type(m).__name__ for m in bot.mambas] == ["Identity"] * 5 + ["VoxelMamba"]
    assert [(m.channel_tokens, m.mamba.d_model) for m in enc.mambas] == [
        (False, 32), (False, 64), (False, 128), (False, 256), (False, 320), (True, 64)]
    with pytest.raises(ValueError, match=r"backbone umamba_bot: nnU-Net's topology .* set train.patch_size to"):
        build_network("segmentation", "umamba_bot", None, 1, 3, (60, 64, 16), spacing=(0.8, 0.8, 3.0))


def test_umambas_mamba_layer_runs_in_float32_under_autocast_as_upstream():
    torch.manual_seed(0)
    layer = VoxelMamba(8, channel_tokens=False, backend="torch")
    x = torch.randn(1, 8, 4, 4, 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = layer(x.bfloat16())
    assert mixed.dtype == torch.float32
    torch.testing.assert_close(mixed, layer(x.bfloat16().float()))


def test_cli_predicts_with_a_umamba_enc_bundle(mha_inputs, tmp_path):  # noqa: F811
    """The fixed-input, spacing-built peer predicts through `nnmamba predict` as the network it was saved from."""
    in_channels, out_channels, patch, options = 2, 2, [32, 32, 16], TINY["umamba_enc"][3]
    torch.manual_seed(0)
    network = build_network("segmentation", "umamba_enc", None, in_channels, out_channels, patch, **options).eval()
    arch = {"task": "segmentation", "backbone": "umamba_enc", "variant": None, "in_channels": in_channels,
            "out_channels": out_channels, "input_shape": patch, "kwargs": options}
    record = _record(["CT", "MR"], patch=patch)
    save_bundle(tmp_path / "bundle", arch, network.state_dict(), record)
    case = mha_inputs / "case_001_0000.mha"
    command = [sys.executable, "-m", "pipelines.cli", "predict", "--model", str(tmp_path / "bundle"),
               "--input", str(case), "--output", str(tmp_path / "out"), "--device", "cpu"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    expected = predict_cases(network, record, find_input_cases(case, ["CT", "MR"]), tmp_path / "in_process",
                             device="cpu", progress=False)[0]
    written = same_geometry(tmp_path / "out/case_001.mha", case)
    assert np.array_equal(sitk.GetArrayFromImage(written), sitk.GetArrayFromImage(sitk.ReadImage(str(expected))))
