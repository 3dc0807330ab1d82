"""The Triton selective scan (`nnmamba.selective_scan_triton`): output and every gradient against the
sequential float64 reference, on lengths that are and are not a multiple of the chunk (the
classifier's 7 tokens included), and against mamba-ssm's kernels on CUDA.

Without CUDA the kernels run in Triton's interpreter (NumPy on the CPU); without Triton (CI's CPU
machines: the CPU torch wheel brings none) the file is skipped.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

if importlib.util.find_spec("triton") is None:
    pytest.skip("Triton is not installed", allow_module_level=True)
ON_CUDA = torch.cuda.is_available()
if not ON_CUDA:   # read when Triton is imported, so before anything imports it
    os.environ["TRITON_INTERPRET"] = "1"

from nnmamba.selective_scan_triton import CHUNK, selective_scan_triton  # noqa: E402
from nnmamba.ssm import selective_scan_sequential  # noqa: E402

DEVICE = "cuda" if ON_CUDA else "cpu"
NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


def _inputs(batch: int, channels: int, length: int, d_state: int = 16, dtype: torch.dtype = torch.float32,
            device: str = DEVICE) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(batch * 1000 + channels + length)
    shape = (batch, channels, length)
    values = [torch.randn(*shape, generator=g),
              torch.rand(*shape, generator=g) * 0.5 + 0.05,   # delta + bias > 0: a decay below 1 also without softplus
              -torch.rand(channels, d_state, generator=g) * 2 - 0.1,
              torch.randn(batch, d_state, length, generator=g), torch.randn(batch, d_state, length, generator=g),
              torch.randn(channels, generator=g), torch.randn(*shape, generator=g),
              torch.rand(channels, generator=g) * 0.3]
    return [v.to(device=device, dtype=dtype).requires_grad_() for v in values]


def _relative_error(mine: torch.Tensor, reference: torch.Tensor) -> float:
    return float((mine.double().cpu() - reference.double().cpu()).abs().max() / reference.abs().max().clamp_min(1e-12))


def _run(scan, inputs: list[torch.Tensor], grad: torch.Tensor, use_d: bool, use_z: bool, softplus: bool):
    u, delta, A, B, C, D, z, bias = inputs
    out = scan(u, delta, A, B, C, D if use_d else None, z if use_z else None, delta_bias=bias,
               delta_softplus=softplus)
    out.backward(grad.to(out))
    return out.detach(), {n: x.grad for n, x in zip(NAMES, inputs) if x.grad is not None}


# Triton's interpreter takes about a minute per case on a CPU core: there, only the first case runs.
ON_GPU_ONLY = pytest.mark.skipif(not ON_CUDA, reason="the interpreter runs the first case only")


@pytest.mark.parametrize("batch, channels, length, use_d, use_z, softplus", [
    (1, 40, CHUNK + 5, True, True, True),    # a partial last chunk, a partial channel block
    pytest.param(3, 24, 7, True, True, True, marks=ON_GPU_ONLY),   # the classifier's 7 tokens: one short chunk
    pytest.param(1, 64, 2 * CHUNK, True, True, True, marks=ON_GPU_ONLY),   # exact multiples
    pytest.param(2, 40, 2 * CHUNK + 44, False, False, False, marks=ON_GPU_ONLY),   # no D, no gate, no softplus
])
def test_output_and_every_gradient_match_the_sequential_reference(batch, channels, length, use_d, use_z, softplus):
    grad = torch.randn(batch, channels, length, generator=torch.Generator().manual_seed(7))
    reference, reference_grads = _run(selective_scan_sequential, _inputs(batch, channels, length, dtype=torch.float64,
                                                                         device="cpu"), grad, use_d, use_z, softplus)
    mine, grads = _run(selective_scan_triton, _inputs(batch, channels, length), grad, use_d, use_z, softplus)
    assert _relative_error(mine, reference) < 1e-5
    assert grads.keys() == reference_grads.keys()
    for name, value in grads.items():
        assert _relative_error(value, reference_grads[name]) < 1e-4, name


@pytest.mark.skipif(not ON_CUDA, reason="bf16 kernels need a GPU")
def test_bf16_inputs_stay_close_to_float32() -> None:
    grad = torch.randn(4, 128, 4096, generator=torch.Generator().manual_seed(3))
    full, full_grads = _run(selective_scan_triton, _inputs(4, 128, 4096), grad, True, True, True)
    half, half_grads = _run(selective_scan_triton, _inputs(4, 128, 4096, dtype=torch.bfloat16), grad, True, True, True)
    assert half.dtype == torch.bfloat16 and _relative_error(half, full) < 2e-2
    for name, value in half_grads.items():
        assert _relative_error(value, full_grads[name]) < 5e-2, name


@pytest.mark.skipif(not ON_CUDA, reason="mamba-ssm's kernels need a GPU")
@pytest.mark.parametrize("length", [7, 1000, 32768])
def test_fwd_and_bwd_match_mamba_ssm_on_the_fused_blocks_strided_layout(length: int) -> None:
    reference = pytest.importorskip("selective_scan_cuda")
    from nnmamba import selective_scan_triton as triton_scan

    batch, channels, d_state = 2, 128, 16
    g = torch.Generator(device="cuda").manual_seed(length)
    # The fused block's d-major layout: [d, batch, L] storage read as [batch, d, L].
    u, delta, z, dout = (torch.randn(channels, batch, length, device="cuda", generator=g).transpose(0, 1)
                         for _ in range(4))
    delta = delta * 0.5 - 1
    B, C = (torch.randn(d_state, batch, length, device="cuda", generator=g).transpose(0, 1).unsqueeze(1)
            for _ in range(2))
    A = -torch.rand(channels, d_state, device="cuda", generator=g) * 2 - 0.1
    D, bias = (torch.randn(channels, device="cuda", generator=g) for _ in range(2))
    results = []
    for scan in (reference, triton_scan):
        out, states, out_z = scan.fwd(u, delta, A, B, C, D, z, bias, True)
        results.append((out_z, *scan.bwd(u, delta, A, B, C, D, z, bias, dout, states, out, None, True, True)[:8]))
    names = ("out_z", "du", "ddelta", "dA", "dB", "dC", "dD", "delta_bias", "dz")
    for name, theirs, mine in zip(names, *results):
        assert mine.shape == theirs.shape, name
        assert _relative_error(mine, theirs) < 1e-3, name
