"""The selective scan in Triton, parallel along the sequence: chunk summaries, a carry pass, a rescan.

mamba-ssm's kernels walk each (sequence, channel) pair through all L steps in one block, so at
nnMamba's lengths (32768 tokens, few sequences) they are latency-bound. Here the sequence is cut
into chunks of ``CHUNK`` steps, each scanned by its own program (Triton's associative scan over the
pair (decay, drive) of the linear recurrence h_t = a_t h_{t-1} + b_t):

forward   1. per chunk and state: the chunk's total decay and its end state from a zero start;
          2. per (sequence, channel block): the chunk-start states, one sequential pass over chunks;
          3. per chunk: the rescan from the chunk-start state, y = C h + D u, the z gate.
backward  the same three passes for the adjoint g_t = C_t dy_t + a_{t+1} g_{t+1}, run in reverse,
          where the third pass also recomputes h from the saved chunk-start states and forms every
          gradient; reductions over channels (dB, dC) and over positions (dA, dD, the delta bias) go
          through atomic adds into float32 buffers.

The semantics are mamba-ssm's ``selective_scan_cuda`` with one group of B and C: delta <-
softplus(delta + delta_bias) (threshold 20, as torch's softplus), the D skip, out_z = y * silu(z),
float32 state whatever the input dtype. ``fwd`` and ``bwd`` take that extension's arguments and
return its results, so ``nnmamba.ssm_kernels`` can call either; ``selective_scan_triton`` is the
same pair as an autograd function (the parity tests use it). Tensors [batch, channels, L] may have
any strides with a unit last stride (the fused block's d-major views).

Hand-written: no maintained library has a sequence-parallel Mamba-1 selective scan (mamba-ssm's
Triton kernels are Mamba-2's scalar-decay SSD, which this recurrence is not).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

CHUNK = 128          # positions per program
CHANNELS = 32        # channels per program


@triton.jit
def _then(a1, b1, a2, b2):
    """Compose two affine steps h -> a h + b: first (a1, b1), then (a2, b2)."""
    return a1 * a2, a2 * b1 + b2


@triton.jit
def _tile(channels, length, BD: tl.constexpr, T: tl.constexpr):
    """This program's (chunk, channel block, sequence), its channel and position offsets and masks."""
    chunk, block, seq = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_d = block * BD + tl.arange(0, BD)
    offs_t = chunk * T + tl.arange(0, T)
    mask_d, mask_t = offs_d < channels, offs_t < length
    return chunk, seq, offs_d, offs_t, mask_d, mask_t, mask_d[:, None] & mask_t[None, :]


@triton.jit
def _load(ptr, seq, stride_b, stride_d, offs_d, offs_t, mask):
    """A [channels, T] tile of a [batch, channels, L] tensor, in float32 (0 outside)."""
    return tl.load(ptr + seq * stride_b + offs_d[:, None] * stride_d + offs_t[None, :], mask=mask, other=0.0
                   ).to(tl.float32)


@triton.jit
def _store(ptr, seq, stride_b, stride_d, offs_d, offs_t, mask, value):
    tl.store(ptr + seq * stride_b + offs_d[:, None] * stride_d + offs_t[None, :], value, mask=mask)


@triton.jit
def _row(ptr, seq, stride_b, stride_n, n, offs_t, mask_t):
    """State n's [T] row of B or C ([batch, N, L]), in float32."""
    return tl.load(ptr + seq * stride_b + n * stride_n + offs_t, mask=mask_t, other=0.0).to(tl.float32)


@triton.jit
def _delta(delta_ptr, bias_ptr, seq, stride_b, stride_d, offs_d, offs_t, mask, mask_d, SOFTPLUS: tl.constexpr):
    """(delta, d delta / d raw delta): softplus(delta + bias) in float32 with torch's threshold of 20,
    and its slope. Outside the sequence delta is 0, so a = 1 and b = 0 there."""
    raw = _load(delta_ptr, seq, stride_b, stride_d, offs_d, offs_t, mask)
    raw += tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0)[:, None]
    slope = raw * 0.0 + 1.0
    if SOFTPLUS:
        slope = tl.where(raw <= 20.0, tl.sigmoid(raw), 1.0)
        raw = tl.where(raw <= 20.0, tl.log(1.0 + tl.exp(raw)), raw)
    return tl.where(mask, raw, 0.0), slope


@triton.jit
def _column(tile, index, T: tl.constexpr):
    """Column `index` of a [channels, T] tile."""
    return tl.sum(tl.where((tl.arange(0, T) == index)[None, :], tile, 0.0), axis=1)


@triton.jit
def _grad_y(dout_ptr, z_ptr, seq, offs_d, offs_t, mask, sg_b, sg_d, sz_b, sz_d, HAS_Z: tl.constexpr):
    """(dL/dy through the gate, silu(z), d silu(z)/dz, dL/d out); without z: (dout, 1, 0, dout)."""
    dout = _load(dout_ptr, seq, sg_b, sg_d, offs_d, offs_t, mask)
    if HAS_Z:
        z = _load(z_ptr, seq, sz_b, sz_d, offs_d, offs_t, mask)
        gate = tl.sigmoid(z)
        return dout * z * gate, z * gate, gate * (1.0 + z * (1.0 - gate)), dout
    return dout, dout * 0.0 + 1.0, dout * 0.0, dout


@triton.jit
def _fwd_summary(u_ptr, delta_ptr, bias_ptr, A_ptr, B_ptr, decay_ptr, end_ptr,
                 channels, length, n_chunks, su_b, su_d, sd_b, sd_d, sA_d, sB_b, sB_n,
                 N: tl.constexpr, BD: tl.constexpr, T: tl.constexpr, SOFTPLUS: tl.constexpr):
    chunk, seq, offs_d, offs_t, mask_d, mask_t, mask = _tile(channels, length, BD, T)
    u = _load(u_ptr, seq, su_b, su_d, offs_d, offs_t, mask)
    dt, _ = _delta(delta_ptr, bias_ptr, seq, sd_b, sd_d, offs_d, offs_t, mask, mask_d, SOFTPLUS)
    dtu = dt * u
    out = ((seq * channels + offs_d) * n_chunks + chunk) * N
    for n in range(N):
        A_n = tl.load(A_ptr + offs_d * sA_d + n, mask=mask_d, other=0.0)
        B_n = _row(B_ptr, seq, sB_b, sB_n, n, offs_t, mask_t)
        decay, state = tl.associative_scan((tl.exp(dt * A_n[:, None]), dtu * B_n[None, :]), 1, _then)
        tl.store(decay_ptr + out + n, _column(decay, T - 1, T), mask=mask_d)
        tl.store(end_ptr + out + n, _column(state, T - 1, T), mask=mask_d)


@triton.jit
def _carry(decay_ptr, local_ptr, carry_ptr, channels, n_chunks,
           N: tl.constexpr, NP: tl.constexpr, BD: tl.constexpr, REVERSE: tl.constexpr):
    """carry[c] = the state entering chunk c (REVERSE: the adjoint entering it from chunk c + 1)."""
    block, seq = tl.program_id(0), tl.program_id(1)
    offs_d = block * BD + tl.arange(0, BD)
    offs_n = tl.arange(0, NP)
    mask = (offs_d < channels)[:, None] & (offs_n < N)[None, :]
    base = (seq * channels + offs_d)[:, None] * n_chunks * N + offs_n[None, :]
    state = tl.zeros([BD, NP], dtype=tl.float32)
    for step in range(n_chunks):
        chunk = step
        if REVERSE:
            chunk = n_chunks - 1 - step
        at = base + chunk * N
        tl.store(carry_ptr + at, state, mask=mask)
        state = tl.load(decay_ptr + at, mask=mask, other=0.0) * state + tl.load(local_ptr + at, mask=mask, other=0.0)


@triton.jit
def _fwd_output(u_ptr, delta_ptr, bias_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, start_ptr, out_ptr, out_z_ptr,
                channels, length, n_chunks, su_b, su_d, sd_b, sd_d, sz_b, sz_d, so_b, so_d, soz_b, soz_d,
                sA_d, sB_b, sB_n, sC_b, sC_n,
                N: tl.constexpr, BD: tl.constexpr, T: tl.constexpr, SOFTPLUS: tl.constexpr,
                HAS_D: tl.constexpr, HAS_Z: tl.constexpr):
    chunk, seq, offs_d, offs_t, mask_d, mask_t, mask = _tile(channels, length, BD, T)
    u = _load(u_ptr, seq, su_b, su_d, offs_d, offs_t, mask)
    dt, _ = _delta(delta_ptr, bias_ptr, seq, sd_b, sd_d, offs_d, offs_t, mask, mask_d, SOFTPLUS)
    dtu = dt * u
    y = tl.zeros([BD, T], dtype=tl.float32)
    if HAS_D:
        y += tl.load(D_ptr + offs_d, mask=mask_d, other=0.0)[:, None] * u
    start = ((seq * channels + offs_d) * n_chunks + chunk) * N
    for n in range(N):
        A_n = tl.load(A_ptr + offs_d * sA_d + n, mask=mask_d, other=0.0)
        B_n = _row(B_ptr, seq, sB_b, sB_n, n, offs_t, mask_t)
        C_n = _row(C_ptr, seq, sC_b, sC_n, n, offs_t, mask_t)
        decay, state = tl.associative_scan((tl.exp(dt * A_n[:, None]), dtu * B_n[None, :]), 1, _then)
        h0 = tl.load(start_ptr + start + n, mask=mask_d, other=0.0)
        y += (state + decay * h0[:, None]) * C_n[None, :]
    _store(out_ptr, seq, so_b, so_d, offs_d, offs_t, mask, y)
    if HAS_Z:
        z = _load(z_ptr, seq, sz_b, sz_d, offs_d, offs_t, mask)
        _store(out_z_ptr, seq, soz_b, soz_d, offs_d, offs_t, mask, y * z * tl.sigmoid(z))


@triton.jit
def _bwd_summary(delta_ptr, bias_ptr, A_ptr, C_ptr, dout_ptr, z_ptr, decay_ptr, end_ptr,
                 channels, length, n_chunks, sd_b, sd_d, sC_b, sC_n, sg_b, sg_d, sz_b, sz_d, sA_d,
                 N: tl.constexpr, BD: tl.constexpr, T: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_Z: tl.constexpr):
    chunk, seq, offs_d, offs_t, mask_d, mask_t, mask = _tile(channels, length, BD, T)
    mask_next = mask_d[:, None] & (offs_t + 1 < length)[None, :]
    dt_next, _ = _delta(delta_ptr + 1, bias_ptr, seq, sd_b, sd_d, offs_d, offs_t, mask_next, mask_d, SOFTPLUS)
    dy, _, _, _ = _grad_y(dout_ptr, z_ptr, seq, offs_d, offs_t, mask, sg_b, sg_d, sz_b, sz_d, HAS_Z)
    out = ((seq * channels + offs_d) * n_chunks + chunk) * N
    for n in range(N):
        A_n = tl.load(A_ptr + offs_d * sA_d + n, mask=mask_d, other=0.0)
        C_n = _row(C_ptr, seq, sC_b, sC_n, n, offs_t, mask_t)
        decay, adjoint = tl.associative_scan((tl.exp(dt_next * A_n[:, None]), dy * C_n[None, :]), 1, _then,
                                             reverse=True)
        tl.store(decay_ptr + out + n, _column(decay, 0, T), mask=mask_d)
        tl.store(end_ptr + out + n, _column(adjoint, 0, T), mask=mask_d)


@triton.jit
def _bwd_grads(u_ptr, delta_ptr, bias_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, dout_ptr, y_ptr,
               start_ptr, carry_ptr, du_ptr, ddelta_ptr, dz_ptr, out_z_ptr, dA_ptr, dB_ptr, dC_ptr, dD_ptr,
               dbias_ptr, channels, length, n_chunks,
               su_b, su_d, sd_b, sd_d, sz_b, sz_d, sg_b, sg_d, sy_b, sy_d, sdu_b, sdu_d, sdd_b, sdd_d,
               sdz_b, sdz_d, soz_b, soz_d, sA_d, sB_b, sB_n, sC_b, sC_n,
               N: tl.constexpr, BD: tl.constexpr, T: tl.constexpr, SOFTPLUS: tl.constexpr,
               HAS_D: tl.constexpr, HAS_Z: tl.constexpr, OUT_Z: tl.constexpr):
    chunk, seq, offs_d, offs_t, mask_d, mask_t, mask = _tile(channels, length, BD, T)
    mask_next = mask_d[:, None] & (offs_t + 1 < length)[None, :]
    u = _load(u_ptr, seq, su_b, su_d, offs_d, offs_t, mask)
    dt, slope = _delta(delta_ptr, bias_ptr, seq, sd_b, sd_d, offs_d, offs_t, mask, mask_d, SOFTPLUS)
    dt_next, _ = _delta(delta_ptr + 1, bias_ptr, seq, sd_b, sd_d, offs_d, offs_t, mask_next, mask_d, SOFTPLUS)
    y = _load(y_ptr, seq, sy_b, sy_d, offs_d, offs_t, mask)
    dy, gate, gate_slope, dout = _grad_y(dout_ptr, z_ptr, seq, offs_d, offs_t, mask, sg_b, sg_d, sz_b, sz_d,
                                         HAS_Z)
    dtu = dt * u
    du = tl.zeros([BD, T], dtype=tl.float32)
    if HAS_D:
        D = tl.load(D_ptr + offs_d, mask=mask_d, other=0.0)
        du += D[:, None] * dy
        tl.atomic_add(dD_ptr + offs_d, tl.sum(dy * u, axis=1), mask=mask_d)
    ddt = tl.zeros([BD, T], dtype=tl.float32)
    states = ((seq * channels + offs_d) * n_chunks + chunk) * N
    for n in range(N):
        A_n = tl.load(A_ptr + offs_d * sA_d + n, mask=mask_d, other=0.0)
        B_n = _row(B_ptr, seq, sB_b, sB_n, n, offs_t, mask_t)
        C_n = _row(C_ptr, seq, sC_b, sC_n, n, offs_t, mask_t)
        drive = dtu * B_n[None, :]
        decay, state = tl.associative_scan((tl.exp(dt * A_n[:, None]), drive), 1, _then)
        h = state + decay * tl.load(start_ptr + states + n, mask=mask_d, other=0.0)[:, None]
        back, adjoint = tl.associative_scan((tl.exp(dt_next * A_n[:, None]), dy * C_n[None, :]), 1, _then,
                                            reverse=True)
        g = adjoint + back * tl.load(carry_ptr + states + n, mask=mask_d, other=0.0)[:, None]
        decayed = h - drive                       # a_t h_{t-1}, without dividing by a_t
        du += g * dt * B_n[None, :]
        ddt += g * (A_n[:, None] * decayed + B_n[None, :] * u)
        tl.atomic_add(dA_ptr + offs_d * N + n, tl.sum(g * dt * decayed, axis=1), mask=mask_d)
        tl.atomic_add(dB_ptr + (seq * N + n) * length + offs_t, tl.sum(g * dtu, axis=0), mask=mask_t)
        tl.atomic_add(dC_ptr + (seq * N + n) * length + offs_t, tl.sum(dy * h, axis=0), mask=mask_t)
    ddt = tl.where(mask, ddt * slope, 0.0)
    tl.atomic_add(dbias_ptr + offs_d, tl.sum(ddt, axis=1), mask=mask_d)
    _store(du_ptr, seq, sdu_b, sdu_d, offs_d, offs_t, mask, du)
    _store(ddelta_ptr, seq, sdd_b, sdd_d, offs_d, offs_t, mask, ddt)
    if HAS_Z:
        _store(dz_ptr, seq, sdz_b, sdz_d, offs_d, offs_t, mask, dout * y * gate_slope)
        if OUT_Z:
            _store(out_z_ptr, seq, soz_b, soz_d, offs_d, offs_t, mask, y * gate)


def _state_inputs(X: Tensor) -> Tensor:
    """B or C as [batch, N, L] (mamba-ssm's one-group [batch, 1, N, L] view accepted)."""
    return X.squeeze(1) if X.dim() == 4 else X


def _unit_last(x: Tensor | None) -> Tensor | None:
    return x if x is None or x.stride(-1) == 1 else x.contiguous()


def _strides(x: Tensor | None) -> tuple[int, int]:
    """(batch, channel) strides of a [batch, channels, L] tensor; (0, 0) for an absent one."""
    return (0, 0) if x is None else (x.stride(0), x.stride(1))


def _operands(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None, z: Tensor | None,
              delta_bias: Tensor | None) -> dict:
    """What every launch reads: unit-last-stride tensors, float32 A/D/bias (a zero bias when absent),
    the grid (chunks, channel blocks, sequences) and the per-chunk state buffer shape."""
    batch, channels, length = u.shape
    bias = delta_bias if delta_bias is not None else torch.zeros(channels, device=u.device)
    grid = (triton.cdiv(length, CHUNK), triton.cdiv(channels, CHANNELS), batch)
    return {"u": _unit_last(u), "delta": _unit_last(delta), "A": A.float().contiguous(),
            "B": _unit_last(_state_inputs(B)), "C": _unit_last(_state_inputs(C)),
            "D": D.float().contiguous() if D is not None else None, "z": _unit_last(z),
            "bias": bias.float().contiguous(), "grid": grid,
            "states": (batch, channels, grid[0], A.shape[1])}


def _carried(decay: Tensor, local: Tensor, reverse: bool) -> Tensor:
    batch, channels, n_chunks, d_state = decay.shape
    carry = torch.empty_like(decay)
    _carry[(triton.cdiv(channels, CHANNELS), batch)](decay, local, carry, channels, n_chunks, N=d_state,
                                                     NP=triton.next_power_of_2(d_state), BD=CHANNELS,
                                                     REVERSE=reverse)
    return carry


def fwd(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None, z: Tensor | None,
        delta_bias: Tensor | None, delta_softplus: bool) -> tuple[Tensor, Tensor, Tensor | None]:
    """(out, chunk-start states, out_z): mamba-ssm's ``selective_scan_cuda.fwd`` (out is y before the gate)."""
    o = _operands(u, delta, A, B, C, D, z, delta_bias)
    u, delta, A, B, C, z, grid = o["u"], o["delta"], o["A"], o["B"], o["C"], o["z"], o["grid"]
    channels, length, d_state = u.shape[1], u.shape[2], A.shape[1]
    decay, end = (torch.empty(o["states"], device=u.device, dtype=torch.float32) for _ in range(2))
    _fwd_summary[grid](u, delta, o["bias"], A, B, decay, end, channels, length, grid[0], *_strides(u),
                       *_strides(delta), A.stride(0), B.stride(0), B.stride(1),
                       N=d_state, BD=CHANNELS, T=CHUNK, SOFTPLUS=delta_softplus)
    start = _carried(decay, end, reverse=False)
    out = torch.empty_like(u)
    out_z = torch.empty_like(z) if z is not None else None
    _fwd_output[grid](u, delta, o["bias"], A, B, C, o["D"] if D is not None else o["bias"],
                      z if z is not None else u, start, out, out_z if z is not None else out,
                      channels, length, grid[0], *_strides(u), *_strides(delta), *_strides(z), *_strides(out),
                      *_strides(out_z), A.stride(0), B.stride(0), B.stride(1), C.stride(0), C.stride(1),
                      N=d_state, BD=CHANNELS, T=CHUNK, SOFTPLUS=delta_softplus, HAS_D=D is not None,
                      HAS_Z=z is not None)
    return out, start, out_z


def bwd(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None, z: Tensor | None,
        delta_bias: Tensor | None, dout: Tensor, start: Tensor, out: Tensor, dz: Tensor | None,
        delta_softplus: bool, recompute_out_z: bool) -> tuple[Tensor | None, ...]:
    """(du, ddelta, dA, dB, dC, dD, ddelta_bias, dz, out_z): mamba-ssm's ``selective_scan_cuda.bwd``.

    ``start`` is ``fwd``'s chunk-start states, ``out`` its y; ``dz`` an optional buffer for the
    gate's gradient (the fused block passes a view of its dxz). dB and dC come back [batch, 1, N, L]
    when B and C came so, in float32.
    """
    four_d = B.dim() == 4
    o = _operands(u, delta, A, B, C, D, z, delta_bias)
    u, delta, A, B, C, z, grid = o["u"], o["delta"], o["A"], o["B"], o["C"], o["z"], o["grid"]
    dout, out = _unit_last(dout), _unit_last(out)
    batch, channels, length = u.shape
    d_state = A.shape[1]
    decay, local = (torch.empty(o["states"], device=u.device, dtype=torch.float32) for _ in range(2))
    _bwd_summary[grid](delta, o["bias"], A, C, dout, z if z is not None else dout, decay, local, channels, length,
                       grid[0], *_strides(delta), C.stride(0), C.stride(1), *_strides(dout), *_strides(z),
                       A.stride(0), N=d_state, BD=CHANNELS, T=CHUNK, SOFTPLUS=delta_softplus, HAS_Z=z is not None)
    carry = _carried(decay, local, reverse=True)
    du, ddelta = torch.empty_like(u), torch.empty_like(delta)
    if z is not None and dz is None:
        dz = torch.empty_like(z)
    out_z = torch.empty_like(z) if z is not None and recompute_out_z else None
    zeros = {"device": u.device, "dtype": torch.float32}
    dA = torch.zeros(channels, d_state, **zeros)
    dD, dbias = torch.zeros(channels, **zeros), torch.zeros(channels, **zeros)
    dB, dC = torch.zeros(batch, d_state, length, **zeros), torch.zeros(batch, d_state, length, **zeros)
    _bwd_grads[grid](u, delta, o["bias"], A, B, C, o["D"] if D is not None else o["bias"], z if z is not None else u,
                     dout, out, start, carry, du, ddelta, dz if z is not None else du,
                     out_z if out_z is not None else du, dA, dB, dC, dD, dbias, channels, length, grid[0],
                     *_strides(u), *_strides(delta), *_strides(z), *_strides(dout), *_strides(out), *_strides(du),
                     *_strides(ddelta), *_strides(dz if z is not None else None), *_strides(out_z),
                     A.stride(0), B.stride(0), B.stride(1), C.stride(0), C.stride(1),
                     N=d_state, BD=CHANNELS, T=CHUNK, SOFTPLUS=delta_softplus, HAS_D=D is not None,
                     HAS_Z=z is not None, OUT_Z=out_z is not None)
    if four_d:
        dB, dC = dB.unsqueeze(1), dC.unsqueeze(1)
    return (du, ddelta, dA, dB, dC, dD if D is not None else None,
            dbias if delta_bias is not None else None, dz, out_z)


class _SelectiveScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus):
        out, start, out_z = fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
        ctx.delta_softplus = delta_softplus
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, start, out)
        return out_z if z is not None else out

    @staticmethod
    def backward(ctx, grad):
        u, delta, A, B, C, D, z, delta_bias, start, out = ctx.saved_tensors
        du, ddelta, dA, dB, dC, dD, dbias, dz, _ = bwd(u, delta, A, B, C, D, z, delta_bias, grad, start, out,
                                                       None, ctx.delta_softplus, False)
        return (du, ddelta, dA.to(A.dtype), dB.to(B.dtype), dC.to(C.dtype),
                dD.to(D.dtype) if D is not None else None, dz,
                dbias.to(delta_bias.dtype) if delta_bias is not None else None, None)


def selective_scan_triton(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None,
                          z: Tensor | None = None, delta_bias: Tensor | None = None,
                          delta_softplus: bool = False) -> Tensor:
    """``nnmamba.ssm.selective_scan``'s arguments and result (B, C: [batch, N, L]) on these kernels."""
    return _SelectiveScan.apply(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
