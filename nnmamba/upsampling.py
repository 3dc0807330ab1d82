"""2x trilinear upsampling (align_corners=False) that keeps the input's dtype and memory layout.

`F.interpolate(..., mode="trilinear")` is on autocast's float32 list and has no channels-last
kernel: in the bf16 channels_last_3d network every decoder upsampling wrote a float32 NCDHW
tensor (the largest, 2 x 32 x 128^3, is 0.5 GB), which the next convolution converted back to
bf16 channels-last, and its backward went through the same conversions plus atomics. At scale 2
the interpolation weights are fixed, 3/4 and 1/4, and separable: each axis is doubled in turn by
two `lerp`s written straight into the even and odd positions of a tensor laid out like the input,
and the backward is the transposed stencil. Same values as `F.interpolate` (up to rounding in
the input's dtype), no float32 round trip, no layout conversion.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

_SPATIAL_START = 2  # [N, C, *spatial]


def _like(x: Tensor, shape: list[int]) -> Tensor:
    """An empty tensor of `shape` in x's dtype, device and memory format (channels-last stays so)."""
    layout = torch.channels_last_3d if x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d) \
        and not x.is_contiguous() else torch.contiguous_format
    return torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=layout)


def _double_axis(x: Tensor, dim: int) -> Tensor:
    """out[2i] = 3/4 x[i] + 1/4 x[i-1], out[2i+1] = 3/4 x[i] + 1/4 x[i+1], indices clamped at the ends."""
    size = x.shape[dim]
    shape = list(x.shape)
    shape[dim] = 2 * size
    out = _like(x, shape)
    even = _strided(out, dim, 0)
    odd = _strided(out, dim, 1)
    even.narrow(dim, 0, 1).copy_(x.narrow(dim, 0, 1))
    odd.narrow(dim, size - 1, 1).copy_(x.narrow(dim, size - 1, 1))
    if size > 1:
        torch.lerp(x.narrow(dim, 1, size - 1), x.narrow(dim, 0, size - 1), 0.25, out=even.narrow(dim, 1, size - 1))
        torch.lerp(x.narrow(dim, 0, size - 1), x.narrow(dim, 1, size - 1), 0.25, out=odd.narrow(dim, 0, size - 1))
    return out


def _halve_axis_adjoint(grad: Tensor, dim: int) -> Tensor:
    """The transpose of `_double_axis`: gradient w.r.t. its input from the gradient of its output."""
    size = grad.shape[dim] // 2
    shape = list(grad.shape)
    shape[dim] = size
    even, odd = _strided(grad, dim, 0), _strided(grad, dim, 1)
    result = _like(grad, shape)
    torch.add(even, odd, out=result).mul_(0.75)
    result.narrow(dim, 0, 1).add_(even.narrow(dim, 0, 1), alpha=0.25)
    result.narrow(dim, size - 1, 1).add_(odd.narrow(dim, size - 1, 1), alpha=0.25)
    if size > 1:
        result.narrow(dim, 0, size - 1).add_(even.narrow(dim, 1, size - 1), alpha=0.25)
        result.narrow(dim, 1, size - 1).add_(odd.narrow(dim, 0, size - 1), alpha=0.25)
    return result


def _strided(x: Tensor, dim: int, offset: int) -> Tensor:
    """Every other index of `dim`, starting at `offset`: a view."""
    index = [slice(None)] * x.dim()
    index[dim] = slice(offset, None, 2)
    return x[tuple(index)]


class _Upsample2x(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        for dim in range(_SPATIAL_START, x.dim()):
            x = _double_axis(x, dim)
        return x

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor) -> Tensor:
        for dim in reversed(range(_SPATIAL_START, grad.dim())):
            grad = _halve_axis_adjoint(grad, dim)
        return grad


def upsample_trilinear_2x(x: Tensor) -> Tensor:
    """`F.interpolate(x, scale_factor=2, mode="trilinear", align_corners=False)` in x's dtype and layout.

    x: [N, C, D, H, W] (any number of spatial dims works the same way). Autocast does not apply:
    the arithmetic is done in x's dtype (each lerp rounds once), as the convolution that follows
    would round it anyway.
    """
    with torch.autocast(x.device.type, enabled=False):
        return _Upsample2x.apply(x)
