"""nnMamba's BatchNorm3d against torch's nn.BatchNorm3d: same outputs, gradients and running statistics."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from nnmamba.blocks import BatchNorm3d

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))]


def _pair(channels: int, device: str) -> tuple[nn.BatchNorm3d, BatchNorm3d]:
    reference = nn.BatchNorm3d(channels).to(device)
    with torch.no_grad():
        reference.weight.uniform_(0.5, 1.5)
        reference.bias.uniform_(-0.5, 0.5)
    ours = BatchNorm3d(channels).to(device)
    ours.load_state_dict(reference.state_dict())
    return reference, ours


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("memory_format", [torch.channels_last_3d, torch.contiguous_format], ids=["cl3d", "ncdhw"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_training_steps_match_torch(device: str, memory_format: torch.memory_format, dtype: torch.dtype) -> None:
    reference, ours = _pair(6, device)
    generator = torch.Generator().manual_seed(0)
    for _ in range(2):
        x = (torch.randn(2, 6, 5, 4, 7, generator=generator) * 3 + 1).to(device, dtype)
        x = x.contiguous(memory_format=memory_format)
        upstream = torch.randn(x.shape, generator=generator).to(device, dtype)
        outputs, grads = [], []
        for module in (reference, ours):
            leaf = x.detach().requires_grad_()
            with torch.autocast(device, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
                out = module(leaf)
            (out.float() * upstream.float()).sum().backward()
            outputs.append(out)
            grads.append([leaf.grad, module.weight.grad, module.bias.grad])
        tolerance = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
        torch.testing.assert_close(outputs[1], outputs[0], **tolerance)
        assert outputs[1].is_contiguous(memory_format=memory_format)
        for got, expected in zip(grads[1], grads[0], strict=True):
            torch.testing.assert_close(got, expected, **tolerance)
    for name, buffer in reference.named_buffers():
        torch.testing.assert_close(dict(ours.named_buffers())[name], buffer)


@pytest.mark.parametrize("device", DEVICES)
def test_eval_uses_the_running_statistics(device: str) -> None:
    reference, ours = _pair(3, device)
    reference.running_mean.fill_(0.5)
    reference.running_var.fill_(2.0)
    ours.load_state_dict(reference.state_dict())
    x = torch.randn(1, 3, 4, 4, 4, device=device).contiguous(memory_format=torch.channels_last_3d)
    torch.testing.assert_close(ours.eval()(x), reference.eval()(x))


def test_state_dict_is_torchs() -> None:
    assert BatchNorm3d(4).state_dict().keys() == nn.BatchNorm3d(4).state_dict().keys()
