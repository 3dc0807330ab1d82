"""The Mamba block's CUDA arithmetic: one autograd Function over the selective-scan and causal-conv1d kernels.

Upstream's `mamba_inner_fn` keeps its projections in a token-major [(batch*L), channels] layout
and its kernels in a channel-major [batch, channels, L] one, so every call transposes the largest
tensors of the block several times (forward and backward: ~8 ms of copies per nnMamba training
step on an H200). Here every projection is a batched matrix product that reads and writes the
layout the next step wants, so nothing of size [batch, d_inner, L] is ever transposed:

    tokens [n, L, d_model] --in_proj (bmm)--> xz [n*G, 2*d_inner, L] --conv1d, x_proj, dt_proj-->
    selective scan --> y [n*G, d_inner, L] --out_proj (bmm)--> [n, L, d_out]

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
from types import ModuleType

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable


@functools.cache
def _extensions() -> tuple[ModuleType, ModuleType]:
    import causal_conv1d_cuda
    import selective_scan_cuda

    return causal_conv1d_cuda, selective_scan_cuda


@functools.cache
def kernels_importable() -> bool:
    """True when both compiled extensions import (needs a CUDA build of torch and the packages).

    Cached because a failed import of a CUDA extension is slow and never changes in a process.
    """
    try:
        _extensions()
    except (ImportError, OSError):
        return False
    return True


def _batched(weight: Tensor, batch: int) -> Tensor:
    """A [out, in] weight as a [batch, out, in] view (stride 0): one strided-batched GEMM, no copy."""
    return weight.expand(batch, *weight.shape)


def _in_projection(tokens: Tensor, weight: Tensor, bias: Tensor | None, groups: int) -> Tensor:
    """tokens [n, L, d_model] -> xz [n*groups, 2*d_inner, L], L contiguous."""
    n, length, _ = tokens.shape
    xz = torch.bmm(_batched(weight, n), tokens.transpose(1, 2))
    if bias is not None:
        xz += bias.unsqueeze(-1)
    return xz.view(n * groups, -1, length)


def _conv_and_projections(xz: Tensor, conv_weight: Tensor, conv_bias: Tensor | None, x_proj_weight: Tensor,
                          dt_proj_weight: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """silu(causal conv1d(x)), x_dbl = x_proj(that) as [b, dt_rank + 2*d_state, L], delta = dt_proj(dt)."""
    conv1d, _ = _extensions()
    d_inner, dt_rank = dt_proj_weight.shape
    x = xz[:, :d_inner]
    conv_out = torch.empty_like(x, memory_format=torch.contiguous_format)
    conv1d.causal_conv1d_fwd(x, conv_weight, conv_bias, None, None, conv_out, None, True)
    batch = xz.shape[0]
    x_dbl = torch.bmm(_batched(x_proj_weight, batch), conv_out)
    delta = torch.bmm(_batched(dt_proj_weight, batch), x_dbl[:, :dt_rank])
    return conv_out, x_dbl, delta


def _state_inputs(x_dbl: Tensor, dt_rank: int, d_state: int) -> tuple[Tensor, Tensor]:
    """B and C as the kernels' [b, groups=1, d_state, L] views of x_dbl (L contiguous, no copy)."""
    B = x_dbl[:, dt_rank:dt_rank + d_state].unsqueeze(1)
    C = x_dbl[:, dt_rank + d_state:].unsqueeze(1)
    return B, C


class _MambaKernels(torch.autograd.Function):
    """Forward and backward of the whole block (projections included) on the CUDA kernels.

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
        xz = _in_projection(tokens, in_weight, in_bias, groups)
        conv_out, x_dbl, delta = _conv_and_projections(xz, conv_weight, conv_bias, x_proj_weight, dt_proj_weight)
        B, C = _state_inputs(x_dbl, dt_rank, A.shape[1])
        out, states, gated = scan.fwd(conv_out, delta, A, B, C, D, xz[:, d_inner:], dt_bias, True)
        result = torch.bmm(gated.view(n, groups * d_inner, length).transpose(1, 2), _batched(out_weight.t(), n))
        if out_bias is not None:
            result += out_bias
        ctx.groups = groups
        ctx.save_for_backward(tokens, in_weight, in_bias, conv_weight, conv_bias, x_proj_weight, dt_proj_weight,
                              A, D, dt_bias, out_weight, out_bias, states, out)
        return result

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
        grad = grad.contiguous()
        xz = _in_projection(tokens, in_weight, in_bias, groups)
        conv_out, x_dbl, delta = _conv_and_projections(xz, conv_weight, conv_bias, x_proj_weight, dt_proj_weight)
        B, C = _state_inputs(x_dbl, dt_rank, d_state)
        batch = xz.shape[0]

        grad_t = grad.transpose(1, 2)  # [n, d_out, L] view
        grad_y = torch.bmm(_batched(out_weight.t(), n), grad_t).view(batch, d_inner, length)
        dxz = torch.empty_like(xz)
        dconv_out, ddelta, dA, dB, dC, dD, ddt_bias, _, gated = scan.bwd(
            conv_out, delta, A, B, C, D, xz[:, d_inner:], dt_bias, grad_y, states, out, dxz[:, d_inner:], True, True
        )
        dout_weight = torch.bmm(grad_t, gated.view(n, groups * d_inner, length).transpose(1, 2)).sum(0)
        dout_bias = grad.sum((0, 1)) if out_bias is not None else None

        dx_dbl = torch.empty_like(x_dbl)
        dx_dbl[:, dt_rank:dt_rank + d_state] = dB.squeeze(1)
        dx_dbl[:, dt_rank + d_state:] = dC.squeeze(1)
        ddt_proj_weight = torch.bmm(ddelta, x_dbl[:, :dt_rank].transpose(1, 2)).sum(0)
        dx_dbl[:, :dt_rank] = torch.bmm(_batched(dt_proj_weight.t(), batch), ddelta)
        dx_proj_weight = torch.bmm(dx_dbl, conv_out.transpose(1, 2)).sum(0)
        dconv_out.baddbmm_(_batched(x_proj_weight.t(), batch), dx_dbl)

        dconv_weight = torch.zeros_like(conv_weight, dtype=torch.float32)
        dconv_bias = torch.zeros_like(conv_bias, dtype=torch.float32) if conv_bias is not None else None
        conv1d.causal_conv1d_bwd(xz[:, :d_inner], conv_weight, conv_bias, dconv_out, None, None, None,
                                 dxz[:, :d_inner], dconv_weight, dconv_bias, None, True)

        dxz_flat = dxz.view(n, -1, length)
        dtokens = torch.bmm(dxz_flat.transpose(1, 2), _batched(in_weight, n))
        din_weight = torch.bmm(dxz_flat, tokens).sum(0)
        din_bias = dxz_flat.sum((0, 2)) if in_bias is not None else None
        return (dtokens, din_weight, din_bias, dconv_weight.to(conv_weight.dtype),
                dconv_bias.to(conv_bias.dtype) if conv_bias is not None else None, dx_proj_weight,
                ddt_proj_weight, dA, dD, ddt_bias, dout_weight, dout_bias, None)


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
            cast(tokens), cast(in_weight), cast(in_bias), conv_weight, conv_bias, cast(x_proj_weight),
            cast(dt_proj_weight), A, D, dt_bias, cast(out_weight), cast(out_bias), groups,
        )
