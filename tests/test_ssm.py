"""The selective scan and the Mamba block against plain references written out here.

- `selective_scan` (parallel, chunked) against `selective_scan_sequential` (one Python step per time
  step, plain autograd) in float64: outputs and the gradient of every input; plus gradcheck.
- float32 with decays that underflow (delta up to 5, A down to -16) over L = 4096 against float64.
- The whole block on the torch back end against `naive_mamba` below (explicit causal conv and
  recurrence), outputs and parameter gradients.
- Parameter names/shapes/initialisation against tables written from upstream's
  `mamba_ssm.modules.mamba_simple.Mamba.__init__` (mamba-ssm 2.x).
- GPU (marked `gpu`, skipped without CUDA and the mamba-ssm kernels): torch vs cuda back end, and a
  real `mamba_ssm.Mamba` sharing our state_dict.
"""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from nnmamba.ssm import Mamba, cuda_kernels_available, selective_scan, selective_scan_sequential

SCAN_INPUTS = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


def make_scan_inputs(batch, channels, d_state, length, *, use_D, use_z, use_bias, dtype=torch.float64,
                     seed=0, delta_scale=1.0, A_scale=3.0):
    """Random inputs for selective_scan; optional ones are None when not used."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=dtype)

    return {
        "u": randn(batch, channels, length),
        "delta": torch.rand(batch, channels, length, generator=g, dtype=dtype) * delta_scale,
        "A": -torch.rand(channels, d_state, generator=g, dtype=dtype) * A_scale,
        "B": randn(batch, d_state, length),
        "C": randn(batch, d_state, length),
        "D": randn(channels) if use_D else None,
        "z": randn(batch, channels, length) if use_z else None,
        "delta_bias": randn(channels) * 0.5 if use_bias else None,
    }


def outputs_and_grads(scan, inputs, softplus, **kwargs):
    leaves = {k: v.clone().requires_grad_() for k, v in inputs.items() if v is not None}
    out = scan(**{**inputs, **leaves}, delta_softplus=softplus, **kwargs)
    weights = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)
    grads = torch.autograd.grad((out * weights).sum(), list(leaves.values()))
    return out.detach(), dict(zip(leaves, grads))


# batch, channels, d_state, length, chunk_size, use_D, use_z, use_bias, softplus
EDGE_CASES = [
    (2, 3, 4, 1, None, True, True, True, True),  # L = 1
    (1, 2, 3, 1, 1, False, False, False, False),  # L = 1, nothing optional
    (2, 3, 5, 7, None, True, False, True, True),  # odd L, one chunk
    (2, 4, 3, 37, 8, True, True, False, False),  # L not a multiple of the chunk, 5 chunks
    (1, 3, 2, 64, 16, False, True, True, True),  # L an exact multiple, 4 chunks
    (2, 2, 4, 33, 1, True, True, True, True),  # every step its own chunk
    (1, 2, 3, 50, 64, False, False, True, False),  # chunk longer than L
    (3, 2, 2, 129, 32, False, True, False, True),  # odd L over several chunks
]


def random_cases(count, seed):
    rng = random.Random(seed)
    cases = []
    for _ in range(count):
        length = rng.choice([1, 2, 3, rng.randint(4, 200)])
        chunk = rng.choice([None, rng.randint(1, 40)])
        flags = [rng.random() < 0.5 for _ in range(4)]
        cases.append((rng.randint(1, 3), rng.randint(1, 5), rng.randint(1, 6), length, chunk, *flags))
    return cases


@pytest.mark.parametrize("case", EDGE_CASES + random_cases(8, seed=1234), ids=str)
def test_parallel_scan_equals_sequential_float64(case):
    batch, channels, d_state, length, chunk, use_D, use_z, use_bias, softplus = case
    inputs = make_scan_inputs(batch, channels, d_state, length, use_D=use_D, use_z=use_z, use_bias=use_bias,
                              seed=length)
    out, grads = outputs_and_grads(selective_scan, inputs, softplus, chunk_size=chunk)
    ref_out, ref_grads = outputs_and_grads(selective_scan_sequential, inputs, softplus)
    assert out.shape == (batch, channels, length)
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-12)
    assert set(grads) == set(ref_grads) == {k for k in SCAN_INPUTS if inputs[k] is not None}
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-9, atol=1e-11, msg=name)


def test_parallel_scan_gradcheck():
    inputs = make_scan_inputs(1, 2, 2, 5, use_D=True, use_z=True, use_bias=True, seed=7)
    leaves = tuple(inputs[k].requires_grad_() for k in SCAN_INPUTS)

    def scan(*args):
        return selective_scan(*args[:6], z=args[6], delta_bias=args[7], delta_softplus=True, chunk_size=2)

    assert torch.autograd.gradcheck(scan, leaves, eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("chunk", [None, 1000])
def test_float32_stays_finite_and_close_with_underflowing_decays(chunk):
    # delta up to 5 and A down to -16: exp(delta*A) reaches exp(-80), below float32's normal range,
    # so products of decays underflow; any exp(-cumsum) trick would overflow here.
    inputs64 = make_scan_inputs(1, 6, 16, 4096, use_D=True, use_z=True, use_bias=False, seed=3,
                                delta_scale=5.0, A_scale=16.0)
    inputs64["A"][:, 0] = -1e-3  # and one slowly decaying state that remembers the whole sequence
    inputs32 = {k: v.float() if v is not None else None for k, v in inputs64.items()}
    out32, grads32 = outputs_and_grads(selective_scan, inputs32, False, chunk_size=chunk)
    out64, grads64 = outputs_and_grads(selective_scan_sequential, inputs64, False)
    assert torch.isfinite(out32).all()
    assert (out32.double() - out64).norm() / out64.norm() < 1e-5
    for name, grad in grads32.items():
        assert torch.isfinite(grad).all(), name
        assert (grad.double() - grads64[name]).norm() / grads64[name].norm() < 1e-5, name


def test_scan_runs_in_float32_under_bfloat16_autocast():
    inputs = make_scan_inputs(2, 4, 3, 19, use_D=True, use_z=True, use_bias=True, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = selective_scan(**inputs, delta_softplus=True, chunk_size=8)
    in_float32 = selective_scan(**{k: v.float() for k, v in inputs.items()}, delta_softplus=True, chunk_size=8)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, in_float32.to(torch.bfloat16))


def denormals_flushed() -> bool:
    return torch.tensor([1e-39]).mul(1.0).item() == 0.0


@pytest.mark.parametrize("flushed", [False, True])
def test_cpu_scan_leaves_the_callers_denormal_mode_as_it_was(flushed):
    # The scan flushes denormals while it runs (they made it ~9x slower); the caller's mode is restored.
    inputs = make_scan_inputs(1, 3, 4, 50, use_D=True, use_z=True, use_bias=True, dtype=torch.float32,
                              delta_scale=5.0, A_scale=16.0)
    torch.set_flush_denormal(flushed)
    try:
        outputs_and_grads(selective_scan, inputs, True, chunk_size=16)
        assert denormals_flushed() == flushed
    finally:
        torch.set_flush_denormal(False)


def test_scan_rejects_bad_shapes_and_chunk_size():
    inputs = make_scan_inputs(2, 3, 4, 5, use_D=True, use_z=False, use_bias=False)
    with pytest.raises(ValueError, match=r"B must have shape \(2, 4, 5\)"):
        selective_scan(**{**inputs, "B": inputs["B"][:, :, :4]})
    with pytest.raises(ValueError, match="D must have shape"):
        selective_scan_sequential(**{**inputs, "D": torch.ones(2, dtype=torch.float64)})
    with pytest.raises(ValueError, match="chunk_size"):
        selective_scan(**inputs, chunk_size=0)


# ---------------------------------------------------------------------------------------------
# The block
# ---------------------------------------------------------------------------------------------


def naive_mamba(block: Mamba, hidden: torch.Tensor) -> torch.Tensor:
    """The Mamba block written out step by step (float64 reference)."""
    batch, length, _ = hidden.shape
    xz = F.linear(hidden, block.in_proj.weight, block.in_proj.bias)
    x, z = xz.split(block.d_inner, dim=-1)  # [batch, length, d_inner]
    kernel = block.conv1d.weight[:, 0, :]  # [d_inner, d_conv]
    conv_steps = []
    for t in range(length):  # causal: output t sees inputs t-d_conv+1 .. t
        acc = torch.zeros_like(x[:, 0])
        for k in range(block.d_conv):
            source = t - (block.d_conv - 1) + k
            if source >= 0:
                acc = acc + kernel[:, k] * x[:, source]
        if block.conv1d.bias is not None:
            acc = acc + block.conv1d.bias
        conv_steps.append(acc * torch.sigmoid(acc))
    x = torch.stack(conv_steps, dim=1)
    x_dbl = x @ block.x_proj.weight.t()
    dt, B, C = x_dbl.split([block.dt_rank, block.d_state, block.d_state], dim=-1)
    delta = F.softplus(dt @ block.dt_proj.weight.t() + block.dt_proj.bias)
    A = -torch.exp(block.A_log)
    state = torch.zeros(batch, block.d_inner, block.d_state, dtype=hidden.dtype)
    outputs = []
    for t in range(length):
        decay = torch.exp(delta[:, t, :, None] * A)
        state = decay * state + delta[:, t, :, None] * B[:, t, None, :] * x[:, t, :, None]
        y = (state * C[:, t, None, :]).sum(-1) + block.D * x[:, t]
        outputs.append(y * z[:, t] * torch.sigmoid(z[:, t]))
    return F.linear(torch.stack(outputs, dim=1), block.out_proj.weight, block.out_proj.bias)


BLOCK_CASES = [
    # d_model, d_state, d_conv, expand, bias, conv_bias, batch, length
    (8, 4, 4, 2, False, True, 2, 11),
    (20, 3, 2, 1, True, False, 1, 6),
    (16, 5, 4, 2, False, True, 2, 2),  # shorter than the conv kernel
    (12, 2, 3, 2, True, True, 1, 1),
]


@pytest.mark.parametrize("case", BLOCK_CASES, ids=str)
def test_block_torch_backend_equals_naive_reference(case):
    d_model, d_state, d_conv, expand, bias, conv_bias, batch, length = case
    torch.manual_seed(0)
    block = Mamba(d_model, d_state=d_state, d_conv=d_conv, expand=expand, bias=bias, conv_bias=conv_bias,
                  backend="torch").double()
    with torch.no_grad():  # move D and the biases off their neutral init so they are exercised
        for name, param in block.named_parameters():
            if name == "D" or name.endswith("bias") and name != "dt_proj.bias":
                param.add_(torch.randn_like(param) * 0.5)
    hidden = torch.randn(batch, length, d_model, dtype=torch.float64)
    weights = torch.randn(batch, length, d_model, dtype=torch.float64)
    out = block(hidden)
    grads = torch.autograd.grad((out * weights).sum(), list(block.parameters()))
    ref = naive_mamba(block, hidden)
    ref_grads = torch.autograd.grad((ref * weights).sum(), list(block.parameters()))
    assert block.last_backend == "torch"
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    for (name, _), grad, ref_grad in zip(block.named_parameters(), grads, ref_grads):
        torch.testing.assert_close(grad, ref_grad, rtol=1e-9, atol=1e-11, msg=name)


def test_block_under_bfloat16_autocast_is_close_to_float32():
    torch.manual_seed(0)
    block = Mamba(16, backend="torch")
    hidden = torch.randn(2, 40, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = block(hidden)
    ref = block(hidden)
    assert out.dtype == torch.bfloat16
    assert torch.isfinite(out).all()
    assert (out.float() - ref).norm() / ref.norm() < 5e-2


def test_block_rejects_wrong_input_shape():
    with pytest.raises(ValueError, match=r"expected input \[batch, length, 8\]"):
        Mamba(8)(torch.randn(2, 5, 7))


# Written from mamba_simple.Mamba.__init__: d_inner = expand*d_model, dt_rank = ceil(d_model/16);
# in_proj d_model->2*d_inner, depthwise conv1d, x_proj d_inner->dt_rank+2*d_state, dt_proj
# dt_rank->d_inner (bias), A_log [d_inner, d_state], D [d_inner], out_proj d_inner->d_model.
UPSTREAM_LAYOUTS = [
    (dict(d_model=16), {
        "in_proj.weight": (64, 16), "conv1d.weight": (32, 1, 4), "conv1d.bias": (32,),
        "x_proj.weight": (33, 32), "dt_proj.weight": (32, 1), "dt_proj.bias": (32,),
        "A_log": (32, 16), "D": (32,), "out_proj.weight": (16, 32),
    }),
    (dict(d_model=40, d_state=8, d_conv=3, expand=1, bias=True, conv_bias=False), {
        "in_proj.weight": (80, 40), "in_proj.bias": (80,), "conv1d.weight": (40, 1, 3),
        "x_proj.weight": (19, 40), "dt_proj.weight": (40, 3), "dt_proj.bias": (40,),
        "A_log": (40, 8), "D": (40,), "out_proj.weight": (40, 40), "out_proj.bias": (40,),
    }),
    (dict(d_model=64, d_state=16, d_conv=4, expand=2, dt_rank=8), {
        "in_proj.weight": (256, 64), "conv1d.weight": (128, 1, 4), "conv1d.bias": (128,),
        "x_proj.weight": (40, 128), "dt_proj.weight": (128, 8), "dt_proj.bias": (128,),
        "A_log": (128, 16), "D": (128,), "out_proj.weight": (64, 128),
    }),
    (dict(d_model=33, d_state=2, d_conv=2, expand=3), {
        "in_proj.weight": (198, 33), "conv1d.weight": (99, 1, 2), "conv1d.bias": (99,),
        "x_proj.weight": (7, 99), "dt_proj.weight": (99, 3), "dt_proj.bias": (99,),
        "A_log": (99, 2), "D": (99,), "out_proj.weight": (33, 99),
    }),
]


@pytest.mark.parametrize("kwargs,expected", UPSTREAM_LAYOUTS, ids=lambda x: str(x.get("d_model", "")))
def test_parameter_layout_matches_upstream(kwargs, expected):
    block = Mamba(**kwargs)
    assert {name: tuple(value.shape) for name, value in block.state_dict().items()} == expected


def test_initialisation_matches_upstream():
    dt_min, dt_max = 0.002, 0.05
    block = Mamba(48, d_state=6, dt_min=dt_min, dt_max=dt_max)
    d_inner, dt_rank = 96, 3
    torch.testing.assert_close(block.A_log, torch.log(torch.arange(1.0, 7.0)).expand(d_inner, 6))
    torch.testing.assert_close(block.D, torch.ones(d_inner))
    assert block.A_log.dtype == block.D.dtype == torch.float32
    assert block.A_log._no_weight_decay and block.D._no_weight_decay
    assert block.dt_proj.bias._no_reinit
    dt = F.softplus(block.dt_proj.bias)
    assert ((dt >= dt_min * (1 - 1e-4)) & (dt <= dt_max * (1 + 1e-4))).all()
    assert block.dt_proj.weight.abs().max() <= dt_rank**-0.5
    constant = Mamba(48, dt_init="constant", dt_scale=2.0)
    torch.testing.assert_close(constant.dt_proj.weight, torch.full((96, 3), 2.0 * 3**-0.5))
    floored = Mamba(8, dt_min=1e-6, dt_max=1e-5, dt_init_floor=1e-4)
    torch.testing.assert_close(F.softplus(floored.dt_proj.bias), torch.full((16,), 1e-4), rtol=1e-4, atol=0)


def test_state_dict_round_trips_between_backends():
    torch.manual_seed(0)
    source = Mamba(12, d_state=4, backend="torch")
    target = Mamba(12, d_state=4, backend="auto")
    target.load_state_dict(source.state_dict())
    hidden = torch.randn(2, 9, 12)
    torch.testing.assert_close(target(hidden), source(hidden), rtol=0, atol=0)


def test_backend_selection_on_cpu():
    block = Mamba(8, backend="auto")
    assert block.backend_for("cpu") == "torch"
    block(torch.randn(1, 3, 8))
    assert block.last_backend == "torch"
    assert Mamba(8, backend="torch").backend_for("cuda") == "torch"
    with pytest.raises(ValueError, match="backend must be one of"):
        Mamba(8, backend="triton")
    with pytest.raises(ValueError, match="dt_init"):
        Mamba(8, dt_init="normal")


@pytest.mark.skipif(cuda_kernels_available(), reason="the CUDA kernels are installed here")
def test_cuda_backend_without_kernels_says_how_to_install():
    with pytest.raises(RuntimeError, match=r"pip install nnmamba\[cuda\]"):
        Mamba(8, backend="cuda")


def test_import_does_not_import_mamba_ssm():
    code = (
        "import sys, torch, nnmamba.ssm as ssm\n"
        "ssm.Mamba(8)(torch.randn(1, 4, 8))\n"
        "assert not [m for m in sys.modules if m.startswith(('mamba_ssm', 'causal_conv1d'))], 'imported'\n"
    )
    repo = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "-c", code], cwd=repo, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


# ---------------------------------------------------------------------------------------------
# GPU: the CUDA kernels against the torch back end and against upstream's module
# ---------------------------------------------------------------------------------------------

needs_kernels = pytest.mark.skipif(
    not (torch.cuda.is_available() and cuda_kernels_available()), reason="needs CUDA and mamba-ssm kernels"
)
GPU_SHAPES = [
    # batch, length, d_model, d_state, d_conv, expand
    (2, 64, 16, 16, 4, 2),
    (1, 3, 24, 8, 4, 2),  # shorter than the conv kernel
    (2, 2065, 32, 16, 3, 2),  # past the kernel's 2048-step chunk
    (3, 500, 40, 4, 2, 1),
]


@pytest.fixture
def exact_fp32():
    """TF32 would make the two back ends differ by ~1e-3 for reasons unrelated to them."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def relative_error(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


@pytest.mark.gpu
@needs_kernels
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=str)
def test_cuda_backend_matches_torch_backend(shape, exact_fp32):
    batch, length, d_model, d_state, d_conv, expand = shape
    torch.manual_seed(0)
    reference = Mamba(d_model, d_state=d_state, d_conv=d_conv, expand=expand, backend="torch").cuda()
    fast = Mamba(d_model, d_state=d_state, d_conv=d_conv, expand=expand, backend="cuda").cuda()
    assert_backends_agree(reference, fast, (batch, length, d_model), apply=lambda block, x: block(x))


def assert_backends_agree(reference: Mamba, fast: Mamba, shape: tuple[int, int, int], apply) -> None:
    """`fast` (CUDA kernels) given `reference`'s weights: outputs, input and weight gradients within 1e-3."""
    fast.load_state_dict(reference.state_dict())
    hidden = torch.randn(*shape, device="cuda")
    weights = torch.randn(*shape, device="cuda")
    outputs = {}
    for name, block in (("torch", reference), ("cuda", fast)):
        leaf = hidden.clone().requires_grad_()
        out = apply(block, leaf)
        (out * weights).sum().backward()
        assert block.last_backend == name
        outputs[name] = (out.detach(), leaf.grad)
    assert relative_error(outputs["cuda"][0], outputs["torch"][0]) < 1e-3
    assert relative_error(outputs["cuda"][1], outputs["torch"][1]) < 1e-3
    for (name, p_ref), p_fast in zip(reference.named_parameters(), fast.parameters()):
        assert relative_error(p_fast.grad, p_ref.grad) < 1e-3, name


CSS_GPU_SHAPES = [
    # batch, length, d_model, d_state, bias
    (2, 4096, 16, 16, False),  # two of the kernel's 2048-step chunks
    (1, 37, 24, 8, True),  # projection biases on
    (2, 7, 64, 16, False),  # the classifier's 7-token sequence
]


@pytest.mark.gpu
@needs_kernels
@pytest.mark.parametrize("shape", CSS_GPU_SHAPES, ids=str)
def test_css_cuda_backend_matches_torch_backend(shape, exact_fp32):
    """The grouped (channel-flip) projections through the kernels' Function against the torch path."""
    from nnmamba.blocks import ChannelSpatialSiamese

    batch, length, d_model, d_state, bias = shape
    torch.manual_seed(0)
    reference = Mamba(d_model, d_state=d_state, bias=bias, backend="torch").cuda()
    with torch.no_grad():
        for name, param in reference.named_parameters():
            if name in ("in_proj.bias", "out_proj.bias", "conv1d.bias"):
                param.normal_()
    fast = Mamba(d_model, d_state=d_state, bias=bias, backend="cuda").cuda()
    assert_backends_agree(reference, fast, (batch, length, d_model),
                          apply=lambda block, x: ChannelSpatialSiamese(block)(x))


@pytest.mark.gpu
@needs_kernels
def test_cuda_backend_under_bfloat16_autocast_is_close_to_float32():
    torch.manual_seed(0)
    block = Mamba(32, backend="cuda").cuda()
    hidden = torch.randn(2, 3000, 32, device="cuda", requires_grad=True)
    reference = block(hidden)
    (reference_grad,) = torch.autograd.grad(reference.square().sum(), hidden)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = block(hidden)
    (grad,) = torch.autograd.grad(out.float().square().sum(), hidden)
    assert out.dtype == torch.bfloat16
    assert relative_error(out, reference) < 3e-2
    assert relative_error(grad, reference_grad) < 5e-2
    assert all(p.dtype == torch.float32 for p in block.parameters())


@pytest.mark.gpu
@needs_kernels
@pytest.mark.parametrize("backend", ["torch", "cuda"])
def test_upstream_mamba_shares_our_state_dict(backend, exact_fp32):
    from mamba_ssm import Mamba as UpstreamMamba

    kwargs = dict(d_model=24, d_state=16, d_conv=4, expand=2)
    torch.manual_seed(3)
    upstream = UpstreamMamba(**kwargs)
    torch.manual_seed(3)
    ours = Mamba(**kwargs, backend=backend)
    # Same modules built in the same order: a seeded construction gives identical weights.
    assert list(upstream.state_dict()) == list(ours.state_dict())
    for name, value in upstream.state_dict().items():
        assert torch.equal(value, ours.state_dict()[name]), name
    upstream, ours = upstream.cuda(), ours.cuda()
    with torch.no_grad():
        for param in upstream.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    ours.load_state_dict(upstream.state_dict())
    hidden = torch.randn(2, 300, 24, device="cuda")
    assert relative_error(ours(hidden), upstream(hidden)) < 1e-3
    upstream.load_state_dict(ours.state_dict())


def test_the_triton_scan_falls_back_to_mamba_ssm_with_one_warning_where_it_cannot_build(caplog) -> None:
    """Without CUDA (or Triton, or mamba-ssm to check it against) the fused block keeps mamba-ssm's scan."""
    if torch.cuda.is_available():
        pytest.skip("on a GPU the Triton scan may build: tests/test_selective_scan_triton.py covers it")
    from nnmamba import ssm_kernels

    with caplog.at_level("WARNING", logger="nnmamba.ssm_kernels"):
        assert ssm_kernels.use_scan_kernels("triton") == "mamba-ssm"
    assert [r.message.split(":")[0] for r in caplog.records] == [
        "Triton selective scan unavailable, using mamba-ssm's kernels"]
    with pytest.raises(ValueError, match="scan kernels must be one of"):
        ssm_kernels.use_scan_kernels("cutlass")
