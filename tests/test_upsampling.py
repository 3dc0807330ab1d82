"""2x trilinear upsampling against F.interpolate (values, gradients, layout, dtype)."""

import pytest
import torch
import torch.nn.functional as F

from nnmamba.upsampling import upsample_trilinear_2x


@pytest.mark.parametrize("shape", [(2, 3, 4, 5, 6), (1, 2, 1, 3, 2), (1, 1, 1, 1, 1), (1, 2, 5, 1, 7)], ids=str)
@pytest.mark.parametrize("channels_last", [False, True])
def test_values_and_gradients_equal_interpolate_in_float64(shape, channels_last):
    x = torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(sum(shape)))
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last_3d)
    x.requires_grad_()
    reference = F.interpolate(x, scale_factor=2, mode="trilinear", align_corners=False)
    out = upsample_trilinear_2x(x)
    torch.testing.assert_close(out, reference, rtol=1e-12, atol=1e-12)
    weights = torch.randn_like(reference)
    (grad,), (ref_grad,) = (torch.autograd.grad(y, x, weights) for y in (out, reference))
    torch.testing.assert_close(grad, ref_grad, rtol=1e-12, atol=1e-12)


def test_gradcheck():
    x = torch.randn(1, 2, 3, 2, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(upsample_trilinear_2x, (x,))


def test_keeps_bfloat16_and_channels_last_under_autocast():
    x = torch.randn(2, 8, 6, 4, 8).to(torch.bfloat16).contiguous(memory_format=torch.channels_last_3d)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = upsample_trilinear_2x(x)
    reference = F.interpolate(x.double(), scale_factor=2, mode="trilinear", align_corners=False)
    assert out.dtype == torch.bfloat16
    assert out.is_contiguous(memory_format=torch.channels_last_3d)
    # three separable passes, each rounding to bfloat16 once: a few units in the last place
    assert ((out.double() - reference).norm() / reference.norm()).item() < 1e-2
