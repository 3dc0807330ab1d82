"""The Mamba block (selective state space model) with two back ends behind one parameter layout.

nnMamba drops Mamba into 3D CNNs, where the training machines may or may not have the CUDA
kernels of mamba-ssm / causal-conv1d. So the block keeps exactly the parameters (names, shapes,
initialisation) of `mamba_ssm.modules.mamba_simple.Mamba` and picks its arithmetic per call:

* "cuda": the compiled selective-scan and causal-conv1d kernels of mamba-ssm / causal-conv1d,
  driven by `nnmamba.ssm_kernels` (imported lazily; never at `import nnmamba.ssm`),
* "torch": plain PyTorch ops around `selective_scan`, a parallel scan with its own backward.

Checkpoints therefore move freely between the two back ends and the upstream module.
Both back ends can also run several variants of the in/out projections in one call
(`Projections`), which is how the Channel-Spatial Siamese views are computed.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

BACKENDS = ("auto", "cuda", "torch")

# The torch scan materialises a few [chunk, batch, channels, d_state] tensors at a time (four in
# the backward). Sequences are cut into chunks of at most this many elements per such tensor
# (512 MiB in float32) so that peak memory stays bounded however long the sequence is; below the
# bound the whole sequence is one chunk, which is the fastest choice.
_CHUNK_ELEMENTS = 1 << 27


def cuda_kernels_available() -> bool:
    """True when the mamba-ssm and causal-conv1d CUDA kernels import on this machine (cached)."""
    from nnmamba.ssm_kernels import kernels_importable

    return kernels_importable()


# --------------------------------------------------------------------------------------------
# The parallel linear scan
# --------------------------------------------------------------------------------------------


def _scan_in_place(coeff: Tensor, values: Tensor, reverse: bool = False) -> None:
    """Solve h_t = coeff_t * h_{t-1} + values_t along dim 0 (h_{-1} = 0); h overwrites `values`.

    With reverse=True it solves h_t = coeff_t * h_{t+1} + values_t (h_L = 0) instead. `coeff` is
    destroyed. Odd-even reduction: combine neighbouring pairs into one step of half the length,
    recurse, then fill in the positions skipped. That is O(L) work and O(log L) depth with no
    Python loop over positions, and it runs in place, so the scan needs no memory of its own.
    Only products of coefficients are formed (never their inverses), so decays that underflow
    stay exact zeros instead of becoming inf/nan.
    """
    length = coeff.shape[0]
    if length < 2:
        return
    if reverse:
        odd = length % 2
        pair_end, pair_start = slice(odd, length - 1, 2), slice(odd + 1, length, 2)
        skipped, skipped_source = slice(1 - odd, length - 2, 2), slice(2 - odd, length - 1, 2)
    else:
        pair_end, pair_start = slice(1, length, 2), slice(0, length - 1, 2)
        skipped, skipped_source = slice(2, length, 2), slice(1, length - 1, 2)
    values[pair_end].addcmul_(coeff[pair_end], values[pair_start])
    coeff[pair_end].mul_(coeff[pair_start])
    _scan_in_place(coeff[pair_end], values[pair_end], reverse)
    values[skipped].addcmul_(coeff[skipped], values[skipped_source])


def _discretise_into(decay: Tensor, drive: Tensor, delta: Tensor, delta_u: Tensor, A: Tensor, B: Tensor) -> None:
    """Zero-order-hold decay exp(delta*A) and Euler input delta*u*B, time-major [T, b, d, n], into buffers.

    Written into preallocated buffers: fresh [T, b, d, n] tensors on every call cost page faults
    on the CPU and allocator traffic on the GPU, and the backward needs four of them per chunk.
    """
    torch.mul(delta.unsqueeze(-1), A, out=decay).exp_()
    torch.mul(delta_u.unsqueeze(-1), B.unsqueeze(2), out=drive)


def _contract_state(states: Tensor, C: Tensor) -> Tensor:
    """sum_n states[t, b, d, n] * C[t, b, n] as one batched matrix product -> [T, b, d]."""
    steps, batch, channels, d_state = states.shape
    return torch.bmm(states.view(-1, channels, d_state), C.reshape(-1, d_state, 1)).view(steps, batch, channels)


def _weighted_state_sum(weights: Tensor, states: Tensor) -> Tensor:
    """sum_d weights[t, b, d] * states[t, b, d, n] as one batched matrix product -> [T, b, n]."""
    steps, batch, channels, d_state = states.shape
    return torch.bmm(weights.reshape(-1, 1, channels), states.view(-1, channels, d_state)).view(steps, batch, d_state)


def _time_major(x: Tensor) -> Tensor:
    """[batch, k, L] -> contiguous [L, batch, k]: one time step per contiguous block."""
    return x.permute(2, 0, 1).contiguous()


def _chunks(length: int, chunk: int) -> list[tuple[int, int]]:
    return [(start, min(start + chunk, length)) for start in range(0, length, chunk)]


def _chunk_length(chunk_size: int | None, batch: int, channels: int, d_state: int) -> int:
    if chunk_size is None:
        return max(1, _CHUNK_ELEMENTS // (batch * channels * d_state))
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"selective_scan: chunk_size must be a positive int or None, got {chunk_size!r}")
    return chunk_size


def _state_buffers(count: int, steps: int, like: Tensor, d_state: int) -> list[Tensor]:
    """`count` uninitialised [steps, batch, channels, d_state] buffers, reused by every chunk."""
    return [like.new_empty(steps, *like.shape[1:], d_state) for _ in range(count)]


def _denormals_flushed() -> bool:
    """Whether this thread already flushes denormal floats to zero (torch has a setter, no getter)."""
    return torch.tensor([1e-39]).mul(1.0).item() == 0.0


@contextlib.contextmanager
def _flush_denormals(device: torch.device) -> Iterator[None]:
    """Flush denormal floats to zero on the CPU for the duration, restoring the caller's mode after.

    Products of decays pass through the denormal range on their way to zero, and x86 CPUs compute
    on denormals an order of magnitude slower: with the Mamba block's decays this made the CPU
    scan ~9x slower (L=4096: 75 ms -> 8.6 ms flushed, 2 cores). Values below the smallest normal
    float cannot change a sum of normal ones beyond rounding; GPUs flush them the same way.
    """
    if device.type != "cpu" or _denormals_flushed() or not torch.set_flush_denormal(True):
        yield
        return
    try:
        yield
    finally:
        torch.set_flush_denormal(False)


class _SelectiveRecurrence(torch.autograd.Function):
    """y_t = sum_n C_tn h_tn with h_t = exp(delta_t A) h_{t-1} + delta_t u_t B_t, per channel.

    Inputs are [batch, channels, L] (u, delta), [channels, d_state] (A), [batch, d_state, L]
    (B, C). Autograd would keep every [L, batch, channels, d_state] intermediate; instead only
    the inputs and the states at chunk starts are saved, and the backward recomputes the states
    and runs the adjoint recurrence g_t = dy_t C_t + exp(delta_{t+1} A) g_{t+1} as a reverse scan.
    Internally everything is time-major so each time step is one contiguous block.
    """

    @staticmethod
    def forward(ctx, u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, chunk: int) -> Tensor:
        with _flush_denormals(u.device):
            y = _scan_forward(u, delta, A, B, C, chunk, ctx)
        return y.permute(1, 2, 0).contiguous()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y: Tensor) -> tuple[Tensor | None, ...]:
        with _flush_denormals(grad_y.device), torch.autocast(device_type=grad_y.device.type, enabled=False):
            return _scan_backward(ctx, grad_y)


def _scan_forward(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, chunk: int, ctx) -> Tensor:
    """The forward recurrence chunk by chunk; returns y time-major [L, batch, channels], saves the chunk starts."""
    delta_t, B_t, C_t = (_time_major(x) for x in (delta, B, C))
    delta_u = delta_t * _time_major(u)
    spans = _chunks(delta_t.shape[0], chunk)
    decay_buffer, state_buffer = _state_buffers(2, spans[0][1], delta_t, A.shape[1])
    y = delta_t.new_empty(delta_t.shape)
    starts = u.new_zeros(len(spans), u.shape[0], u.shape[1], A.shape[1])
    for index, (lo, hi) in enumerate(spans):
        decay, states = decay_buffer[: hi - lo], state_buffer[: hi - lo]
        _discretise_into(decay, states, delta_t[lo:hi], delta_u[lo:hi], A, B_t[lo:hi])
        if index > 0:
            states[0].addcmul_(decay[0], starts[index])
        _scan_in_place(decay, states)
        y[lo:hi] = _contract_state(states, C_t[lo:hi])
        if index + 1 < len(spans):
            starts[index + 1] = states[-1]
    ctx.chunk = chunk
    ctx.save_for_backward(u, delta, A, B, C, starts)
    return y


def _scan_backward(ctx, grad_y: Tensor) -> tuple[Tensor | None, ...]:
    """Gradients of u, delta, A, B, C: chunks in reverse order, the adjoint carried between them."""
    u, delta, A, B, C, starts = ctx.saved_tensors
    u_t, delta_t, B_t, C_t, gy_t = (_time_major(x) for x in (u, delta, B, C, grad_y))
    delta_u = delta_t * u_t
    du, ddelta = torch.empty_like(u_t), torch.empty_like(delta_t)
    dB, dC = torch.empty_like(B_t), torch.empty_like(C_t)
    dA = torch.zeros_like(A)
    spans = _chunks(u_t.shape[0], ctx.chunk)
    buffers = _state_buffers(4, spans[0][1], u_t, A.shape[1])
    carry = None
    for index, (lo, hi) in reversed(list(enumerate(spans))):
        inputs = (u_t[lo:hi], delta_t[lo:hi], delta_u[lo:hi], A, B_t[lo:hi], C_t[lo:hi], gy_t[lo:hi])
        chunk_buffers = [buffer[: hi - lo] for buffer in buffers]
        grads = _chunk_backward(*inputs, starts[index] if index > 0 else None, carry, chunk_buffers)
        du[lo:hi], ddelta[lo:hi], dA_chunk, dB[lo:hi], dC[lo:hi], carry = grads
        dA += dA_chunk
    du, ddelta, dB, dC = (x.permute(1, 2, 0) for x in (du, ddelta, dB, dC))
    return du, ddelta, dA, dB, dC, None


def _chunk_backward(
    u: Tensor, delta: Tensor, delta_u: Tensor, A: Tensor, B: Tensor, C: Tensor, grad_y: Tensor,
    initial: Tensor | None, carry: Tensor | None, buffers: list[Tensor],
) -> tuple[Tensor, ...]:
    """Gradients of one time-major chunk, computed in the four [T, b, d, n] `buffers`.

    `initial` is the state entering the chunk, `carry` = exp(delta A) g at the first step of the
    next chunk (the adjoint flowing back into this chunk's last state). Returns du, ddelta, dA,
    dB, dC and the carry for the previous chunk.
    """
    decay, states, coeff, adjoint = buffers
    _discretise_into(decay, states, delta, delta_u, A, B)
    if initial is not None:
        states[0].addcmul_(decay[0], initial)
    coeff.copy_(decay)
    _scan_in_place(coeff, states)
    dC = _weighted_state_sum(grad_y, states)
    torch.mul(grad_y.unsqueeze(-1), C.unsqueeze(2), out=adjoint)
    if carry is not None:
        adjoint[-1] += carry
    coeff[:-1] = decay[1:]
    coeff[-1] = 0
    _scan_in_place(coeff, adjoint, reverse=True)
    carry_back = decay[0] * adjoint[0]
    # d loss / d decay_t = g_t h_{t-1}; times d decay / d(delta A) = decay: written into `decay`.
    decay[1:] *= states[:-1]
    decay[0] = decay[0] * initial if initial is not None else 0
    decay *= adjoint
    ddelta = torch.mul(decay, A, out=coeff).sum(-1)
    dA = decay.mul_(delta.unsqueeze(-1)).sum((0, 1))
    adjoint_B = _contract_state(adjoint, B)
    ddelta += adjoint_B * u
    dB = _weighted_state_sum(delta_u, adjoint)
    return adjoint_B * delta, ddelta, dA, dB, dC, carry_back


# --------------------------------------------------------------------------------------------
# Public scans
# --------------------------------------------------------------------------------------------


def _check_scan_shapes(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None,
                       z: Tensor | None, delta_bias: Tensor | None) -> None:
    if u.dim() != 3:
        raise ValueError(f"selective_scan: u must be [batch, channels, length], got shape {tuple(u.shape)}")
    batch, channels, length = u.shape
    if A.dim() != 2 or A.shape[0] != channels:
        raise ValueError(f"selective_scan: A must be [channels={channels}, d_state], got {tuple(A.shape)}")
    d_state = A.shape[1]
    expected = {
        "delta": (delta, (batch, channels, length)),
        "B": (B, (batch, d_state, length)),
        "C": (C, (batch, d_state, length)),
        "D": (D, (channels,)),
        "z": (z, (batch, channels, length)),
        "delta_bias": (delta_bias, (channels,)),
    }
    for name, (tensor, shape) in expected.items():
        if tensor is not None and tuple(tensor.shape) != shape:
            raise ValueError(f"selective_scan: {name} must have shape {shape}, got {tuple(tensor.shape)}")


def _at_least_float32(x: Tensor) -> Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _compute_dtype(u: Tensor) -> torch.dtype:
    """float32, or float64 for float64 inputs: the recurrence is never run in half precision."""
    return torch.promote_types(u.dtype, torch.float32)


def selective_scan(
    u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None,
    z: Tensor | None = None, delta_bias: Tensor | None = None, delta_softplus: bool = False,
    chunk_size: int | None = None,
) -> Tensor:
    """Selective scan in pure PyTorch; the semantics of mamba-ssm's `selective_scan_ref`.

    u, delta, z: [batch, channels, L]; A: [channels, d_state]; B, C: [batch, d_state, L]
    (input-dependent); D, delta_bias: [channels]. Returns [batch, channels, L] in u's dtype.
    delta <- softplus(delta + delta_bias) when asked; then h_t = exp(delta_t A) h_{t-1} +
    delta_t B_t u_t, y_t = C_t h_t + D u_t, out = y * silu(z).

    The recurrence is a log-depth parallel scan (no loop over positions) run in float32 even
    under autocast. `chunk_size` caps how many time steps are expanded to [.., d_state] at once;
    chunks run one after another with the state carried over. None picks the longest chunk that
    keeps each such tensor under 2**27 elements (512 MiB in float32).
    """
    _check_scan_shapes(u, delta, A, B, C, D, z, delta_bias)
    dtype = _compute_dtype(u)
    chunk = _chunk_length(chunk_size, u.shape[0], u.shape[1], A.shape[1])
    with torch.autocast(device_type=u.device.type, enabled=False):
        u_c, delta_c, A_c, B_c, C_c = (x.to(dtype) for x in (u, delta, A, B, C))
        if delta_bias is not None:
            delta_c = delta_c + delta_bias.to(dtype).unsqueeze(-1)
        if delta_softplus:
            delta_c = F.softplus(delta_c)
        out = _SelectiveRecurrence.apply(u_c, delta_c, A_c, B_c, C_c, chunk)
        if D is not None:
            out = out + u_c * D.to(dtype).unsqueeze(-1)
        if z is not None:
            out = out * F.silu(z.to(dtype))
    return out.to(u.dtype)


def selective_scan_sequential(
    u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None,
    z: Tensor | None = None, delta_bias: Tensor | None = None, delta_softplus: bool = False,
) -> Tensor:
    """The naive reference: one Python step per time step, differentiated by plain autograd.

    Same arguments and result as `selective_scan`; O(L) sequential steps. The tests and the CPU
    benchmark compare the parallel scan against it; it is too slow for training.
    """
    _check_scan_shapes(u, delta, A, B, C, D, z, delta_bias)
    dtype = _compute_dtype(u)
    with torch.autocast(device_type=u.device.type, enabled=False):
        u_c, delta_c, A_c, B_c, C_c = (x.to(dtype) for x in (u, delta, A, B, C))
        if delta_bias is not None:
            delta_c = delta_c + delta_bias.to(dtype).unsqueeze(-1)
        if delta_softplus:
            delta_c = F.softplus(delta_c)
        decay = torch.exp(torch.einsum("bdl,dn->bdln", delta_c, A_c))
        drive = torch.einsum("bdl,bnl,bdl->bdln", delta_c, B_c, u_c)
        state = u_c.new_zeros(u.shape[0], u.shape[1], A.shape[1])
        outputs = []
        # unbind, not indexing: its backward is one stack instead of L full-size zero tensors.
        for decay_t, drive_t, C_t in zip(decay.unbind(2), drive.unbind(2), C_c.unbind(2)):
            state = decay_t * state + drive_t
            outputs.append(torch.einsum("bdn,bn->bd", state, C_t))
        out = torch.stack(outputs, dim=2)
        if D is not None:
            out = out + u_c * D.to(dtype).unsqueeze(-1)
        if z is not None:
            out = out * F.silu(z.to(dtype))
    return out.to(u.dtype)


# --------------------------------------------------------------------------------------------
# The block
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Projections:
    """`groups` variants of a Mamba block's in/out projections, run as one SSM call.

    in_weight [groups*2*d_inner, d_model] (+ in_bias) stacks the variants' in projections;
    out_weight [d_out, groups*d_inner] (+ out_bias) holds their out projections side by side, so
    the one matrix product that applies them also sums the variants' outputs. A flip of the
    input's (output's) channels is a flip of in_weight's columns (out_weight's rows): the
    Channel-Spatial Siamese views need no flipped copy of the data for their channel flips.
    """

    in_weight: Tensor
    in_bias: Tensor | None
    out_weight: Tensor
    out_bias: Tensor | None
    groups: int


class Mamba(nn.Module):
    """Mamba block, [batch, L, d_model] -> [batch, L, d_model]; state_dict of mamba_ssm.Mamba.

    backend: "auto" (CUDA kernels when they import and the input is on CUDA, else torch),
    "cuda" (kernels required) or "torch" (always the pure-PyTorch path). `backend_for(device)`
    tells which one a call will use, `last_backend` which one the last call used.
    """

    def __init__(
        self,
        d_model: int,
        d_state: int = 16,
        d_conv: int = 4,
        expand: float = 2,
        dt_rank: int | str = "auto",
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init: str = "random",
        dt_scale: float = 1.0,
        dt_init_floor: float = 1e-4,
        conv_bias: bool = True,
        bias: bool = False,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"Mamba: backend must be one of {BACKENDS}, got {backend!r}")
        if backend == "cuda" and not cuda_kernels_available():
            raise RuntimeError(
                "Mamba(backend='cuda') needs the mamba-ssm and causal-conv1d CUDA kernels, which do "
                "not import here; install them with `pip install nnmamba[cuda]` (needs nvcc and a "
                "GPU), or use backend='auto' or 'torch'."
            )
        if dt_init not in ("random", "constant"):
            raise ValueError(f"Mamba: dt_init must be 'random' or 'constant', got {dt_init!r}")
        self.backend = backend
        self.last_backend: str | None = None
        self.d_model, self.d_state, self.d_conv, self.expand = d_model, d_state, d_conv, expand
        self.d_inner = int(expand * d_model)
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else int(dt_rank)
        # Same modules, in the same order, as upstream: a seeded construction gives the same weights.
        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=bias)
        self.conv1d = nn.Conv1d(
            self.d_inner, self.d_inner, kernel_size=d_conv, groups=self.d_inner,
            padding=d_conv - 1, bias=conv_bias,
        )
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True)
        self._init_dt_proj(dt_init, dt_scale, dt_min, dt_max, dt_init_floor)
        # S4D-real initialisation A = -(1..d_state), stored as log for positivity.
        A = torch.arange(1, d_state + 1, dtype=torch.float32).repeat(self.d_inner, 1)
        self.A_log = nn.Parameter(torch.log(A))
        self.A_log._no_weight_decay = True
        self.D = nn.Parameter(torch.ones(self.d_inner))
        self.D._no_weight_decay = True
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias)

    def _init_dt_proj(self, dt_init: str, dt_scale: float, dt_min: float, dt_max: float, floor: float) -> None:
        """Keep the dt projection's variance, and start softplus(dt bias) log-uniform in [dt_min, dt_max]."""
        std = self.dt_rank**-0.5 * dt_scale
        if dt_init == "constant":
            nn.init.constant_(self.dt_proj.weight, std)
        else:
            nn.init.uniform_(self.dt_proj.weight, -std, std)
        log_span = math.log(dt_max) - math.log(dt_min)
        dt = torch.exp(torch.rand(self.d_inner) * log_span + math.log(dt_min)).clamp(min=floor)
        with torch.no_grad():
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse of softplus
        # mamba_ssm's model-level weight init zeroes every Linear bias except those flagged so.
        self.dt_proj.bias._no_reinit = True

    def backend_for(self, device: torch.device | str) -> str:
        """The back end ("cuda" or "torch") a call with input on `device` runs on."""
        on_cuda = torch.device(device).type == "cuda"
        if self.backend == "torch":
            return "torch"
        if self.backend == "cuda":
            if not on_cuda:
                raise RuntimeError(f"Mamba(backend='cuda') got an input on {device}; move it to a CUDA device")
            return "cuda"
        return "cuda" if on_cuda and cuda_kernels_available() else "torch"

    def projections(self) -> Projections:
        """The block's own in/out projections (one variant)."""
        return Projections(self.in_proj.weight, self.in_proj.bias, self.out_proj.weight, self.out_proj.bias, 1)

    def forward(self, hidden_states: Tensor) -> Tensor:
        return self.forward_projected(hidden_states, self.projections())

    def forward_projected(self, hidden_states: Tensor, projections: Projections) -> Tensor:
        """The block with `projections` in place of in_proj/out_proj: [n, L, d_model] -> [n, L, d_out].

        Each of the G projection variants runs the SSM core (conv1d, selective scan; shared
        weights) on every sequence, and the out projection sums the G results per sequence.
        """
        if hidden_states.dim() != 3 or hidden_states.shape[-1] != self.d_model:
            raise ValueError(
                f"Mamba: expected input [batch, length, {self.d_model}], got {tuple(hidden_states.shape)}"
            )
        self.last_backend = self.backend_for(hidden_states.device)
        # A, D and the dt bias stay in (at least) float32 even in a half-precision module, as upstream.
        A = -torch.exp(_at_least_float32(self.A_log))
        D, dt_bias = _at_least_float32(self.D), _at_least_float32(self.dt_proj.bias)
        p = projections
        if self.last_backend == "cuda":
            from nnmamba.ssm_kernels import mamba_kernels_forward

            return mamba_kernels_forward(
                hidden_states, p.in_weight, p.in_bias, self.conv1d.weight.view(self.d_inner, self.d_conv),
                self.conv1d.bias, self.x_proj.weight, self.dt_proj.weight, A, D, dt_bias, p.out_weight, p.out_bias,
                p.groups,
            )
        batch, length, _ = hidden_states.shape
        xz = torch.matmul(p.in_weight, hidden_states.transpose(1, 2))
        if p.in_bias is not None:
            xz = xz + p.in_bias.to(xz.dtype).unsqueeze(-1)
        y = self._torch_core(xz.reshape(batch * p.groups, 2 * self.d_inner, length), A, D, dt_bias)
        out = torch.matmul(y.reshape(batch, p.groups * self.d_inner, length).transpose(1, 2), p.out_weight.t())
        return out if p.out_bias is None else out + p.out_bias.to(out.dtype)

    def _torch_core(self, xz: Tensor, A: Tensor, D: Tensor, dt_bias: Tensor) -> Tensor:
        """[b, 2*d_inner, L] -> gated scan output [b, d_inner, L]: conv1d, x/dt projections, selective scan."""
        batch, _, length = xz.shape
        x, z = xz.chunk(2, dim=1)
        x = F.silu(self.conv1d(x)[..., :length])  # padding d_conv-1 then truncation: a causal conv
        x_dbl = self.x_proj(x.transpose(1, 2).reshape(batch * length, self.d_inner))
        dt, B, C = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = (self.dt_proj.weight @ dt.t()).view(self.d_inner, batch, length).transpose(0, 1)
        B, C = (m.view(batch, length, self.d_state).transpose(1, 2) for m in (B, C))
        return selective_scan(x, dt, A, B, C, D, z=z, delta_bias=dt_bias, delta_softplus=True)
