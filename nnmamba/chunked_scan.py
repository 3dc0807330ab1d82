"""The selective scan as Triton kernels that run the chunks of a sequence in parallel.

mamba-ssm's scan kernels give each (sequence, channel) pair one thread block, which walks the
whole sequence chunk after chunk. With nnMamba's shapes (8 sequences x 128 channels x 32768
steps in the first MIC call) that is 1024 long-lived blocks at 18-25 % occupancy (register
bound), mostly waiting: 41-54 % of issue slots busy, a few per cent of DRAM bandwidth (Nsight
Compute, H200, `benchmarks/results/h200_v4/scan_ncu_*.log`). No maintained library has a
chunk-parallel Mamba-1 scan, so it is written here. Each chunk of CHUNK steps is one program,
and a pass runs in three kernels:

1. `_chunk_sums`: every chunk's own contribution, as if nothing came before it (forward: its
   end state from a zero start; backward: its adjoint from a zero end). A weighted sum over the
   chunk: exp(A * sum of delta between the step and the chunk's edge) needs no scan.
2. `_carry`: a scan over chunks turns those into the true state entering each chunk.
3. `_chunk_outputs` / `_chunk_gradients`: each chunk rescans its steps from its true start
   (`tl.associative_scan`) and writes the output, or every gradient.

Recurrence (per channel d and state n; delta = softplus(delta_raw + delta_bias)):
    h_t = exp(delta_t A) h_{t-1} + delta_t u_t B_t,    y_t = C_t . h_t + D u_t,    out_t = y_t silu(z_t)
Adjoint, with dy_t = dout_t silu(z_t):   g_t = exp(delta_{t+1} A) g_{t+1} + C_t dy_t.
The backward keeps the chunk start states of the forward (fp32, [b, d, chunks, n]) and
recomputes everything else, so `y` itself is never stored.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

LOG2E = tl.constexpr(1.4426950408889634)  # exp(x) = exp2(x * log2(e)); exp2 is the hardware instruction


@triton.jit
def _softplus(x):
    """softplus with torch's threshold: x itself above 20."""
    return tl.where(x > 20.0, x, tl.log(1.0 + tl.exp(tl.minimum(x, 20.0))))


@triton.jit
def _linear_step(a1, b1, a2, b2):
    """Compose h -> a1 h + b1 then h -> a2 h + b2 (the scan's associative operator)."""
    return a1 * a2, b1 * a2 + b2


@triton.jit
def _load_rows(ptr, b, rows, steps, s_b, s_row, row_mask, step_mask):
    """A [rows, steps] tile of a [batch, rows, L] tensor whose L stride is 1, as float32."""
    offsets = b * s_b + rows[:, None] * s_row + steps[None, :]
    return tl.load(ptr + offsets, mask=row_mask[:, None] & step_mask[None, :], other=0.0).to(tl.float32)


@triton.jit
def _delta(delta_ptr, bias_ptr, b, d, t, s_b, s_d, d_mask, t_mask):
    """delta = softplus(delta_raw + bias) [BD, T], zero outside the sequence; also delta_raw + bias."""
    raw = _load_rows(delta_ptr, b, d, t, s_b, s_d, d_mask, t_mask)
    raw += tl.load(bias_ptr + d, mask=d_mask, other=0.0)[:, None]
    return tl.where(d_mask[:, None] & t_mask[None, :], _softplus(raw), 0.0), raw


@triton.jit
def _chunk_sums(delta_ptr, bias_ptr, A_ptr, u_ptr, B_ptr, C_ptr, z_ptr, dout_ptr, sums_ptr, totals_ptr,
                L, D, n_chunks, s_xb, s_xd, s_bb, s_bn,
                ADJOINT: tl.constexpr, BD: tl.constexpr, N: tl.constexpr, T: tl.constexpr):
    """Forward: S = sum_t exp(A * delta after t) delta_t u_t B_t. Adjoint: R = sum_t exp(A * delta up to t) C_t dy_t."""
    c, d_block, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    d = d_block * BD + tl.arange(0, BD)
    t = c * T + tl.arange(0, T)
    d_mask, t_mask = d < D, t < L
    delta, _ = _delta(delta_ptr, bias_ptr, b, d, t, s_xb, s_xd, d_mask, t_mask)
    total = tl.sum(delta, axis=1)
    if ADJOINT:
        z = _load_rows(z_ptr, b, d, t, s_xb, s_xd, d_mask, t_mask)
        drive = _load_rows(dout_ptr, b, d, t, s_xb, s_xd, d_mask, t_mask) * z * tl.sigmoid(z)
        span = tl.cumsum(delta, axis=1)
        rows_ptr = C_ptr
    else:
        drive = delta * _load_rows(u_ptr, b, d, t, s_xb, s_xd, d_mask, t_mask)
        span = total[:, None] - tl.cumsum(delta, axis=1)
        rows_ptr = B_ptr
    state_offsets = ((b * D + d) * n_chunks + c) * N
    for n in tl.static_range(N):
        A = tl.load(A_ptr + d * N + n, mask=d_mask, other=0.0) * LOG2E
        row = tl.load(rows_ptr + b * s_bb + n * s_bn + t, mask=t_mask, other=0.0).to(tl.float32)
        result = tl.sum(tl.exp2(A[:, None] * span) * drive * row[None, :], axis=1)
        tl.store(sums_ptr + state_offsets + n, result, mask=d_mask)
    if not ADJOINT:
        tl.store(totals_ptr + (b * D + d) * n_chunks + c, total, mask=d_mask)


@triton.jit
def _carry(sums_ptr, totals_ptr, A_ptr, starts_ptr, D, n_chunks, n_blocks,
           N: tl.constexpr, CB: tl.constexpr, REVERSE: tl.constexpr):
    """State entering each chunk: H_c = exp(A total_c) H_c-1 + S_c, stored one chunk on (back when REVERSE)."""
    d, b = tl.program_id(0), tl.program_id(1)
    n = tl.arange(0, N)
    A = tl.load(A_ptr + d * N + n) * LOG2E
    base = (b * D + d) * n_chunks
    edge = n_chunks - 1 if REVERSE else 0
    tl.store(starts_ptr + (base + edge) * N + n, tl.zeros([N], tl.float32))
    carry = tl.zeros([N], tl.float32)
    first = (tl.arange(0, CB) == 0)[:, None]
    last = (tl.arange(0, CB) == CB - 1)[:, None]
    block = 0
    while block < n_blocks:  # a while loop: Triton's interpreter cannot range over a runtime bound
        k = block * CB + tl.arange(0, CB)
        chunk = n_chunks - 1 - k if REVERSE else k
        valid = k < n_chunks
        own = tl.load(sums_ptr + (base + chunk[:, None]) * N + n[None, :], mask=valid[:, None], other=0.0)
        decay = tl.exp2(A[None, :] * tl.load(totals_ptr + base + chunk, mask=valid, other=0.0)[:, None])
        own = tl.where(first, own + decay * carry[None, :], own)
        _, state = tl.associative_scan((decay, own), 0, _linear_step)
        target = chunk - 1 if REVERSE else chunk + 1
        tl.store(starts_ptr + (base + target[:, None]) * N + n[None, :], state,
                 mask=(valid & (target >= 0) & (target < n_chunks))[:, None])
        carry = tl.sum(tl.where(last, state, 0.0), axis=0)
        block += 1


@triton.jit
def _state_row(ptr, b, n, t, s_bb, s_bn, t_mask):
    """Row n of a [batch, d_state, L] tensor over the chunk's steps, float32 [T]."""
    return tl.load(ptr + b * s_bb + n * s_bn + t, mask=t_mask, other=0.0).to(tl.float32)


@triton.jit
def _state_n(delta, A_n, drive, start_n, T: tl.constexpr):
    """State n of every channel [BD, T] over the chunk, from its entering value start_n [BD]."""
    decay = tl.exp2(A_n[:, None] * delta)
    first = (tl.arange(0, T) == 0)[None, :]
    _, states = tl.associative_scan((decay, tl.where(first, drive + decay * start_n[:, None], drive)), 1,
                                    _linear_step)
    return states


@triton.jit
def _chunk_outputs(delta_ptr, bias_ptr, A_ptr, u_ptr, B_ptr, C_ptr, z_ptr, D_ptr, starts_ptr, out_ptr,
                   L, D, n_chunks, s_xb, s_xd, s_bb, s_bn, s_ob, s_od,
                   BD: tl.constexpr, N: tl.constexpr, T: tl.constexpr):
    """out = (C . h + D u) silu(z) for one chunk, its states rescanned (one state at a time) from the true start."""
    c, d_block, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    d = d_block * BD + tl.arange(0, BD)
    t = c * T + tl.arange(0, T)
    d_mask, t_mask = d < D, t < L
    delta, _ = _delta(delta_ptr, bias_ptr, b, d, t, s_xb, s_xd, d_mask, t_mask)
    u = _load_rows(u_ptr, b, d, t, s_xb, s_xd, d_mask, t_mask)
    drive_u = delta * u
    y = tl.load(D_ptr + d, mask=d_mask, other=0.0)[:, None] * u
    state_offsets = ((b * D + d) * n_chunks + c) * N
    for n in tl.static_range(N):
        A_n = tl.load(A_ptr + d * N + n, mask=d_mask, other=0.0) * LOG2E
        start_n = tl.load(starts_ptr + state_offsets + n, mask=d_mask, other=0.0)
        B_n = _state_row(B_ptr, b, n, t, s_bb, s_bn, t_mask)
        states = _state_n(delta, A_n, drive_u * B_n[None, :], start_n, T)
        y += states * _state_row(C_ptr, b, n, t, s_bb, s_bn, t_mask)[None, :]
    z = _load_rows(z_ptr, b, d, t, s_xb, s_xd, d_mask, t_mask)
    offsets = b * s_ob + d[:, None] * s_od + t[None, :]
    tl.store(out_ptr + offsets, (y * z * tl.sigmoid(z)).to(out_ptr.dtype.element_ty),
             mask=d_mask[:, None] & t_mask[None, :])


@triton.jit
def _chunk_gradients(delta_ptr, bias_ptr, A_ptr, u_ptr, B_ptr, C_ptr, z_ptr, D_ptr, dout_ptr, starts_ptr, ends_ptr,
                     du_ptr, ddelta_ptr, dz_ptr, out_ptr, dA_ptr, dB_ptr, dC_ptr, dD_ptr, dbias_ptr,
                     L, D, n_chunks, s_xb, s_xd, s_bb, s_bn, s_gb, s_gd, s_zb, s_zd, s_ob, s_od,
                     BD: tl.constexpr, N: tl.constexpr, T: tl.constexpr):
    """Every gradient of one chunk, state by state: forward states from the entering state, adjoint from the leaving one."""
    c, d_block, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    d = d_block * BD + tl.arange(0, BD)
    step = tl.arange(0, T)
    t = c * T + step
    d_mask, t_mask = d < D, t < L
    tile_mask = d_mask[:, None] & t_mask[None, :]
    delta, raw = _delta(delta_ptr, bias_ptr, b, d, t, s_xb, s_xd, d_mask, t_mask)
    # The adjoint's decay is the NEXT step's: delta at t + 1 (its last value is unused by the scan).
    next_delta, _ = _delta(delta_ptr + 1, bias_ptr, b, d, t, s_xb, s_xd, d_mask, (t + 1 < L) & (step + 1 < T))
    u = _load_rows(u_ptr, b, d, t, s_xb, s_xd, d_mask, t_mask)
    z = _load_rows(z_ptr, b, d, t, s_xb, s_xd, d_mask, t_mask)
    dout = _load_rows(dout_ptr, b, d, t, s_gb, s_gd, d_mask, t_mask)
    gate = tl.sigmoid(z)
    dy = dout * z * gate
    drive_u = delta * u
    skip = tl.load(D_ptr + d, mask=d_mask, other=0.0)
    y = skip[:, None] * u
    adjoint_B = tl.zeros([BD, T], tl.float32)
    ddelta = tl.zeros([BD, T], tl.float32)
    state_offsets = ((b * D + d) * n_chunks + c) * N
    last = (step == T - 1)[None, :]
    for n in tl.static_range(N):
        A_n = tl.load(A_ptr + d * N + n, mask=d_mask, other=0.0)
        B_n = _state_row(B_ptr, b, n, t, s_bb, s_bn, t_mask)
        C_n = _state_row(C_ptr, b, n, t, s_bb, s_bn, t_mask)
        drive = drive_u * B_n[None, :]
        states = _state_n(delta, A_n * LOG2E, drive, tl.load(starts_ptr + state_offsets + n, mask=d_mask, other=0.0),
                          T)
        y += states * C_n[None, :]
        next_decay = tl.exp2((A_n * LOG2E)[:, None] * next_delta)
        leaving = tl.load(ends_ptr + state_offsets + n, mask=d_mask, other=0.0)
        feed = tl.where(last, dy * C_n[None, :] + leaving[:, None], dy * C_n[None, :])
        _, adjoint = tl.associative_scan((next_decay, feed), 1, _linear_step, reverse=True)
        before = states - drive  # exp(delta_t A) h_{t-1}
        adjoint_B += adjoint * B_n[None, :]
        ddelta += adjoint * A_n[:, None] * before
        row = b * N * L + n * L + t
        tl.atomic_add(dB_ptr + row, tl.sum(adjoint * drive_u, axis=0), mask=t_mask, sem="relaxed")
        tl.atomic_add(dC_ptr + row, tl.sum(states * dy, axis=0), mask=t_mask, sem="relaxed")
        tl.atomic_add(dA_ptr + d * N + n, tl.sum(adjoint * delta * before, axis=1), mask=d_mask, sem="relaxed")
    ddelta += u * adjoint_B
    du = delta * adjoint_B + skip[:, None] * dy
    ddelta_raw = tl.where(raw > 20.0, ddelta, ddelta * tl.sigmoid(raw))
    offsets = b * s_xb + d[:, None] * s_xd + t[None, :]
    tl.store(du_ptr + offsets, du.to(du_ptr.dtype.element_ty), mask=tile_mask)
    tl.store(ddelta_ptr + offsets, ddelta_raw.to(ddelta_ptr.dtype.element_ty), mask=tile_mask)
    tl.store(dz_ptr + b * s_zb + d[:, None] * s_zd + t[None, :],
             (dout * y * gate * (1.0 + z * (1.0 - gate))).to(dz_ptr.dtype.element_ty), mask=tile_mask)
    tl.store(out_ptr + b * s_ob + d[:, None] * s_od + t[None, :], (y * z * gate).to(out_ptr.dtype.element_ty),
             mask=tile_mask)
    tl.atomic_add(dD_ptr + d, tl.sum(dy * u, axis=1), mask=d_mask, sem="relaxed")
    tl.atomic_add(dbias_ptr + d, tl.sum(ddelta_raw, axis=1), mask=d_mask, sem="relaxed")


CARRY_BLOCK = 64  # chunks per step of the carry scan's loop


@dataclass(frozen=True)
class LaunchConfig:
    """Tile of one program: `chunk` steps x `channels` channels (x every state), on `warps` warps.

    Longer chunks amortise the carry but hold more registers; more channels share the B/C loads
    and cut the dB/dC atomics (one per program and step instead of one per channel and step).
    """

    chunk: int = 64
    channels: int = 2
    warps: int = 4


DEFAULT_LAUNCH = LaunchConfig()


def _sequence_views(u: Tensor, delta: Tensor, z: Tensor, B: Tensor, C: Tensor) -> tuple[Tensor, Tensor]:
    """Check the layouts the kernels assume; B and C as [batch, d_state, L] (mamba-ssm passes a group dim)."""
    B, C = (x.squeeze(1) if x.dim() == 4 else x for x in (B, C))
    if not u.stride() == delta.stride() == z.stride():
        raise ValueError("chunked_scan: u, delta and z must share one layout (strides)")
    if u.stride(-1) != 1 or B.stride(-1) != 1 or B.stride() != C.stride():
        raise ValueError("chunked_scan: every tensor needs unit stride along L, and B and C one layout")
    return B, C


def _launch_shape(u: Tensor, d_state: int, launch: LaunchConfig) -> tuple[int, int, int, int, tuple[int, int, int]]:
    batch, dim, length = u.shape
    if d_state & (d_state - 1):
        raise ValueError(f"chunked_scan: d_state must be a power of two, got {d_state}")
    n_chunks = triton.cdiv(length, launch.chunk)
    return batch, dim, length, n_chunks, (n_chunks, triton.cdiv(dim, launch.channels), batch)


def scan_forward(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor, z: Tensor,
                 delta_bias: Tensor, launch: LaunchConfig = DEFAULT_LAUNCH) -> tuple[Tensor, Tensor, Tensor]:
    """out = y * silu(z) [batch, dim, L] in u's dtype and layout; plus what `scan_backward` needs.

    u, delta, z: [batch, dim, L] (one shared layout, unit stride along L); A: [dim, d_state]
    float32; B, C: [batch, (1,) d_state, L]; D, delta_bias: [dim] float32. delta is passed raw:
    softplus(delta + delta_bias) is applied inside, as mamba-ssm's delta_softplus=True.
    Returns (out, chunk start states [batch, dim, chunks, d_state], delta sums [batch, dim, chunks]).
    """
    B, C = _sequence_views(u, delta, z, B, C)
    d_state = A.shape[1]
    batch, dim, length, n_chunks, grid = _launch_shape(u, d_state, launch)
    sums = u.new_empty(batch, dim, n_chunks, d_state, dtype=torch.float32)
    totals = u.new_empty(batch, dim, n_chunks, dtype=torch.float32)
    starts = torch.empty_like(sums)
    strides = (length, dim, n_chunks, u.stride(0), u.stride(1), B.stride(0), B.stride(1))
    _chunk_sums[grid](delta, delta_bias, A, u, B, C, z, z, sums, totals, *strides,
                      ADJOINT=False, BD=launch.channels, N=d_state, T=launch.chunk, num_warps=launch.warps)
    _carry[(dim, batch)](sums, totals, A, starts, dim, n_chunks, triton.cdiv(n_chunks, CARRY_BLOCK), N=d_state, CB=CARRY_BLOCK, REVERSE=False)
    out = torch.empty_like(u)
    _chunk_outputs[grid](delta, delta_bias, A, u, B, C, z, D, starts, out, *strides, out.stride(0), out.stride(1),
                         BD=launch.channels, N=d_state, T=launch.chunk, num_warps=launch.warps)
    return out, starts, totals


def scan_backward(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor, z: Tensor,
                  delta_bias: Tensor, dout: Tensor, starts: Tensor, totals: Tensor, dz: Tensor | None = None,
                  launch: LaunchConfig = DEFAULT_LAUNCH) -> tuple[Tensor, ...]:
    """Gradients of `scan_forward`'s output: (du, ddelta, dA, dB, dC, dD, ddelta_bias, dz, out).

    ddelta is the gradient of the raw delta; dB and dC are float32 [batch, d_state, L]; dz is
    written into `dz` when given (the caller's buffer); `out` is the forward output recomputed.
    """
    B, C = _sequence_views(u, delta, z, B, C)
    d_state = A.shape[1]
    batch, dim, length, n_chunks, grid = _launch_shape(u, d_state, launch)
    strides = (length, dim, n_chunks, u.stride(0), u.stride(1), B.stride(0), B.stride(1))
    sums = torch.empty_like(starts)
    _chunk_sums[grid](delta, delta_bias, A, u, B, C, z, dout, sums, totals, *strides,
                      ADJOINT=True, BD=launch.channels, N=d_state, T=launch.chunk, num_warps=launch.warps)
    ends = torch.empty_like(starts)
    _carry[(dim, batch)](sums, totals, A, ends, dim, n_chunks, triton.cdiv(n_chunks, CARRY_BLOCK), N=d_state, CB=CARRY_BLOCK, REVERSE=True)
    du, ddelta, out = torch.empty_like(u), torch.empty_like(delta), torch.empty_like(u)
    dz = torch.empty_like(z) if dz is None else dz
    dA, dD, ddelta_bias = torch.zeros_like(A), torch.zeros_like(D), torch.zeros_like(delta_bias)
    dB = u.new_zeros(batch, d_state, length, dtype=torch.float32)
    dC = torch.zeros_like(dB)
    _chunk_gradients[grid](delta, delta_bias, A, u, B, C, z, D, dout, starts, ends, du, ddelta, dz, out,
                           dA, dB, dC, dD, ddelta_bias, *strides, dout.stride(0), dout.stride(1),
                           dz.stride(0), dz.stride(1), out.stride(0), out.stride(1),
                           BD=launch.channels, N=d_state, T=launch.chunk, num_warps=launch.warps)
    return du, ddelta, dA, dB, dC, dD, ddelta_bias, dz, out
