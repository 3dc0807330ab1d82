"""The Mamba block's CUDA arithmetic: one autograd Function over the selective-scan and causal-conv1d kernels.

Upstream's `mamba_inner_fn` keeps its projections in a token-major [(batch*L), channels] layout
and its kernels in a channel-major [batch, channels, L] one, so every call transposes the largest
tensors of the block several times (forward and backward: ~8 ms of copies per nnMamba training
step on an H200). Here nothing of size [batch, d_inner, L] is ever transposed: tensors
are d-major, [d_inner, batch*L], which the kernels read as [batch, d_inner, L] through strides,
and every projection (and its weight gradient) is one matrix product over all tokens:

    tokens [n*L, d_model] --in_proj--> xz [2*d_inner, G*n*L] --conv1d, x_proj, dt_proj-->
    selective scan --> y [d_inner, G*n*L] --out_proj--> [n*L, d_out]

`G` weight variants of the in/out projections run as one scan of n*G sequences and the out
projection sums the G results (see `nnmamba.ssm.Projections`); that is how the Channel-Spatial
Siamese views cost one projection each instead of a flipped copy of the data.

Memory: only the input tokens, the scan's output before gating and its chunk states are kept for
the backward; the in projection, conv1d, x/dt projections and the gated output are recomputed
there (matrix products and one conv pass, cheap next to the scan).

The kernels are the compiled extensions of mamba-ssm (`selective_scan_cuda`) and causal-conv1d
(`causal_conv1d_cuda`), imported directly: importing the `mamba_ssm` package costs seconds
(Triton kernels, model code) and is not needed. Nothing here is imported by `import nnmamba`.
"""

from __future__ import annotations

import functools
import logging
from types import ModuleType

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable


SCAN_KERNELS = ("mamba-ssm", "triton")
_triton_scan: ModuleType | None = None   # set by use_scan_kernels("triton") once it built and agreed
log = logging.getLogger(__name__)


@functools.cache
def _compiled_extensions() -> tuple[ModuleType, ModuleType]:
    import causal_conv1d_cuda
    import selective_scan_cuda

    return causal_conv1d_cuda, selective_scan_cuda


def _extensions() -> tuple[ModuleType, ModuleType]:
    """(causal-conv1d, the selective scan chosen by `use_scan_kernels`): both have mamba-ssm's fwd/bwd."""
    conv1d, scan = _compiled_extensions()
    return conv1d, _triton_scan or scan


def use_scan_kernels(name: str) -> str:
    """Run the fused block's selective scan on mamba-ssm's kernels or on ``nnmamba.selective_scan_triton``.

    Triton compiles at the first launch, so "triton" is first compiled and checked against mamba-ssm
    on a small CUDA problem; if Triton is missing, fails to build or disagrees, one warning says
    so and mamba-ssm's kernels stay in use. Returns the kernels now in use.
    """
    global _triton_scan
    if name not in SCAN_KERNELS:
        raise ValueError(f"scan kernels must be one of {SCAN_KERNELS}, got {name!r}")
    _triton_scan = None
    if name == "triton":
        try:
            _triton_scan = _checked_triton_scan()
        except Exception as error:   # any build or launch failure: keep the kernels that work
            log.warning("Triton selective scan unavailable, using mamba-ssm's kernels: %s", error)
    return "mamba-ssm" if _triton_scan is None else "triton"


def _checked_triton_scan() -> ModuleType:
    """The Triton scan module after one small fwd + bwd of both scans on CUDA (which builds its
    kernels); raises if they disagree."""
    from nnmamba import selective_scan_triton

    _, reference = _compiled_extensions()
    generator = torch.Generator(device="cuda").manual_seed(0)
    batch, channels, length, d_state = 2, 48, 300, 16
    u, delta, z, grad = (torch.randn(batch, channels, length, device="cuda", generator=generator) for _ in range(4))
    B, C = (torch.randn(batch, 1, d_state, length, device="cuda", generator=generator) for _ in range(2))
    A = -torch.rand(channels, d_state, device="cuda", generator=generator) - 0.1
    D, bias = (torch.randn(channels, device="cuda", generator=generator) for _ in range(2))
    results = []
    for scan in (reference, selective_scan_triton):
        out, states, out_z = scan.fwd(u, delta, A, B, C, D, z, bias, True)
        results.append((out_z, *scan.bwd(u, delta, A, B, C, D, z, bias, grad, states, out, None, True, False)[:8]))
    for name, mine, theirs in zip(("out_z", "du", "ddelta", "dA", "dB", "dC", "dD", "dbias", "dz"), *results[::-1]):
        if not torch.allclose(mine.float(), theirs.float(), rtol=1e-3, atol=1e-3 * float(theirs.abs().max())):
            raise RuntimeError(f"its {name} differs from mamba-ssm's by {float((mine - theirs).abs().max()):.3g}")
    return selective_scan_triton


@functools.cache
def kernels_importable() -> bool:
    """True when both compiled extensions import (needs a CUDA build of torch and the packages).

    Cached because a failed import of a CUDA extension is slow and never changes in a process.
    """
    try:
        _compiled_extensions()
    except (ImportError, OSError):
        return False
    return True


def _batch_major(x: Tensor) -> Tensor:
    """A d-major [d, batch, L] tensor as the kernels' [batch, d, L] view (strides L, batch*L, 1)."""
    return x.transpose(0, 1)


def _in_projection(tokens: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """tokens [n, L, d_model] -> xz [2*d_inner*G, n*L]: one GEMM (rows interleaved: channel*G + group)."""
    xz = weight @ tokens.reshape(-1, tokens.shape[-1]).t()
    if bias is not None:
        xz += bias.unsqueeze(-1)
    return xz


def _conv_and_projections(x: Tensor, conv_weight: Tensor, conv_bias: Tensor | None, x_proj_weight: Tensor,
                          dt_proj_weight: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """x [d_inner, b, L] -> silu(causal conv1d(x)) [d_inner, b*L], x_dbl [dt_rank + 2*d_state, b*L], delta [d_inner, b*L]."""
    conv1d, _ = _extensions()
    conv_out = torch.empty_like(x)
    conv1d.causal_conv1d_fwd(_batch_major(x), conv_weight, conv_bias, None, None, _batch_major(conv_out), None,
                             True)
    conv_out = conv_out.flatten(1)
    x_dbl = x_proj_weight @ conv_out
    delta = dt_proj_weight @ x_dbl[:dt_proj_weight.shape[1]]
    return conv_out, x_dbl, delta


def _state_inputs(x_dbl: Tensor, dt_rank: int, d_state: int, batch: int) -> tuple[Tensor, Tensor]:
    """B and C as the kernels' [b, groups=1, d_state, L] views of x_dbl [.., b*L] (no copy)."""
    B, C = (x_dbl[start:start + d_state].view(d_state, batch, -1).transpose(0, 1).unsqueeze(1)
            for start in (dt_rank, dt_rank + d_state))
    return B, C


def _d_major(x: Tensor) -> Tensor:
    """A kernel result [b, d, L] as [d, b*L]: a view when the kernel kept the d-major layout of its inputs."""
    return x.transpose(0, 1).reshape(x.shape[1], -1)


class _MambaKernels(torch.autograd.Function):
    """Forward and backward of the whole block (projections included) on the CUDA kernels.

    Layout: every [channels, tokens] tensor is d-major, [d, b*L] with b = G*n sequences ordered
    group-major, which the kernels read as [b, d, L] through strides (each sequence still has
    L contiguous). So each projection and each weight gradient is ONE plain matrix product over
    all b*L tokens (no batched GEMMs with tiny outputs and long reductions), and the G projection
    variants are interleaved rows/columns of one weight (channel*G + group).

    All matrices arrive in the compute dtype (bf16 under autocast); conv1d weights, A, D and the
    dt bias stay float32, as in upstream's block.
    """

    @staticmethod
    def forward(ctx, tokens: Tensor, in_weight: Tensor, in_bias: Tensor | None, conv_weight: Tensor,
                conv_bias: Tensor | None, x_proj_weight: Tensor, dt_proj_weight: Tensor, A: Tensor, D: Tensor,
                dt_bias: Tensor, out_weight: Tensor, out_bias: Tensor | None, groups: int) -> Tensor:
        _, scan = _extensions()
        n, length, _ = tokens.shape
        d_inner, dt_rank = dt_proj_weight.shape
        batch = n * groups
        xz = _in_projection(tokens, in_weight, in_bias).view(2 * d_inner, batch, length)
        conv_out, x_dbl, delta = _conv_and_projections(xz[:d_inner], conv_weight, conv_bias, x_proj_weight,
                                                       dt_proj_weight)
        B, C = _state_inputs(x_dbl, dt_rank, A.shape[1], batch)
        out, states, gated = scan.fwd(_batch_major(conv_out.view(d_inner, batch, length)),
                                      _batch_major(delta.view(d_inner, batch, length)), A, B, C, D,
                                      _batch_major(xz[d_inner:]), dt_bias, True)
        result = torch.addmm(out_bias, _d_major(gated).view(d_inner * groups, n * length).t(), out_weight.t()) \
            if out_bias is not None else _d_major(gated).view(d_inner * groups, n * length).t() @ out_weight.t()
        ctx.groups = groups
        ctx.save_for_backward(tokens, in_weight, in_bias, conv_weight, conv_bias, x_proj_weight, dt_proj_weight,
                              A, D, dt_bias, out_weight, out_bias, states, out)
        return result.view(n, length, -1)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        conv1d, scan = _extensions()
        (tokens, in_weight, in_bias, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, A, D, dt_bias,
         out_weight, out_bias, states, out) = ctx.saved_tensors
        groups = ctx.groups
        n, length, _ = tokens.shape
        d_inner, dt_rank = dt_proj_weight.shape
        d_state = A.shape[1]
        batch = n * groups
        grad = grad.reshape(n * length, -1)
        xz = _in_projection(tokens, in_weight, in_bias).view(2 * d_inner, batch, length)
        conv_out, x_dbl, delta = _conv_and_projections(xz[:d_inner], conv_weight, conv_bias, x_proj_weight,
                                                       dt_proj_weight)
        B, C = _state_inputs(x_dbl, dt_rank, d_state, batch)

        grad_y = (out_weight.t() @ grad.t()).view(d_inner, batch, length)
        dxz = torch.empty_like(xz)
        du, ddelta, dA, dB, dC, dD, ddt_bias, _, gated = scan.bwd(
            _batch_major(conv_out.view(d_inner, batch, length)), _batch_major(delta.view(d_inner, batch, length)),
            A, B, C, D, _batch_major(xz[d_inner:]), dt_bias, _batch_major(grad_y), states, out,
            _batch_major(dxz[d_inner:]), True, True,
        )
        dout_weight = grad.t() @ _d_major(gated).view(d_inner * groups, n * length).t()
        dout_bias = grad.sum(0) if out_bias is not None else None

        ddelta = _d_major(ddelta)
        dx_dbl = torch.empty_like(x_dbl)
        dx_dbl[dt_rank:dt_rank + d_state] = _d_major(dB.squeeze(1))
        dx_dbl[dt_rank + d_state:] = _d_major(dC.squeeze(1))
        ddt_proj_weight = ddelta @ x_dbl[:dt_rank].t()
        torch.mm(dt_proj_weight.t(), ddelta, out=dx_dbl[:dt_rank])
        dx_proj_weight = dx_dbl @ conv_out.t()
        dconv_out = _d_major(du).addmm_(x_proj_weight.t(), dx_dbl)

        dconv_weight = torch.zeros_like(conv_weight, dtype=torch.float32)
        dconv_bias = torch.zeros_like(conv_bias, dtype=torch.float32) if conv_bias is not None else None
        conv1d.causal_conv1d_bwd(_batch_major(xz[:d_inner]), conv_weight, conv_bias,
                                 _batch_major(dconv_out.view(d_inner, batch, length)), None, None, None,
                                 _batch_major(dxz[:d_inner]), dconv_weight, dconv_bias, None, True)

        dxz = dxz.view(-1, n * length)
        dtokens = (dxz.t() @ in_weight).view(n, length, -1)
        din_weight = dxz @ tokens.reshape(n * length, -1)
        din_bias = dxz.sum(1) if in_bias is not None else None
        return (dtokens, din_weight, din_bias, dconv_weight.to(conv_weight.dtype),
                dconv_bias.to(conv_bias.dtype) if conv_bias is not None else None, dx_proj_weight,
                ddt_proj_weight, dA, dD, ddt_bias, dout_weight, dout_bias, None)


def _interleaved(weight: Tensor | None, groups: int, dim: int) -> Tensor | None:
    """Group-stacked rows (dim 0) or columns (dim 1) of a Projections weight, reordered to channel*G + group."""
    if weight is None or groups == 1:
        return weight
    shape = list(weight.shape)
    split = shape[:dim] + [groups, shape[dim] // groups] + shape[dim + 1:]
    return weight.reshape(split).transpose(dim, dim + 1).reshape(shape)


def mamba_kernels_forward(tokens: Tensor, in_weight: Tensor, in_bias: Tensor | None, conv_weight: Tensor,
                          conv_bias: Tensor | None, x_proj_weight: Tensor, dt_proj_weight: Tensor, A: Tensor,
                          D: Tensor, dt_bias: Tensor, out_weight: Tensor, out_bias: Tensor | None,
                          groups: int) -> Tensor:
    """The Mamba block on the CUDA kernels: tokens [n, L, d_model] -> [n, L, d_out], contiguous.

    in_weight [groups*2*d_inner, d_model] and out_weight [d_out, groups*d_inner] hold `groups`
    projection variants (`nnmamba.ssm.Projections`); conv_weight is [d_inner, d_conv]. Under
    autocast the matrices are cast to its dtype here (differentiably, so float32 parameters get
    float32 gradients) and the Function itself runs with autocast off.
    """
    device = tokens.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else tokens.dtype

    def cast(x: Tensor | None) -> Tensor | None:
        return None if x is None else x.to(dtype)

    with torch.autocast(device, enabled=False):
        return _MambaKernels.apply(
            cast(tokens).contiguous(), cast(_interleaved(in_weight, groups, 0)),
            cast(_interleaved(in_bias, groups, 0)), conv_weight, conv_bias, cast(x_proj_weight), cast(dt_proj_weight),
            A, D, dt_bias, cast(_interleaved(out_weight, groups, 1)), cast(out_bias), groups,
        )
