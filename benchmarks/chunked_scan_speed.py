"""The chunk-parallel Triton scan (`nnmamba.chunked_scan`) against mamba-ssm's selective-scan kernels.

Shapes: the three SSM calls of the AMOS miccss training step (B=2 volumes x 4 CSS views = 8
sequences; 128 channels x 32768 steps, 256 x 4096, 512 x 512; d_state 16), bf16 inputs in the
block's d-major layout, delta_softplus on, D and z as the block uses them. For each launch
configuration: forward and backward time (CUDA events, median), and the largest difference to
mamba-ssm, relative to the largest value, for the output and every gradient, in bf16 and in fp32.

    python benchmarks/chunked_scan_speed.py --out benchmarks/results/chunked_scan_speed.json
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path

import torch

from _common import ResultFile, cuda_time_ms, summary
from nnmamba.chunked_scan import LaunchConfig, scan_backward, scan_forward

SHAPES = [(8, 128, 32768), (8, 256, 4096), (8, 512, 512)]
D_STATE = 16
GRADIENTS = ("du", "ddelta", "dA", "dB", "dC", "dD", "ddelta_bias", "dz")


def block_inputs(batch: int, dim: int, length: int, dtype: torch.dtype, seed: int = 0) -> dict[str, torch.Tensor]:
    """Scan inputs laid out as `nnmamba.ssm_kernels` passes them: [dim, batch, L] memory read as [batch, dim, L]."""
    g = torch.Generator(device="cuda").manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, device="cuda")

    def d_major(scale: float = 1.0, shift: float = 0.0) -> torch.Tensor:
        return (randn(dim, batch, length) * scale + shift).to(dtype).transpose(0, 1)

    x_dbl = randn(2 * D_STATE, batch * length).to(dtype)
    B, C = (x_dbl[i * D_STATE:(i + 1) * D_STATE].view(D_STATE, batch, length).transpose(0, 1).unsqueeze(1)
            for i in (0, 1))
    return {"u": d_major(), "delta": d_major(0.5, -3.0), "A": -torch.rand(dim, D_STATE, device="cuda") * D_STATE,
            "B": B, "C": C, "D": randn(dim), "z": d_major(), "delta_bias": randn(dim) * 0.1,
            "dout": d_major()}


def mamba_pass(x: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    import selective_scan_cuda

    args = [x[k] for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")]
    out, states, gated = selective_scan_cuda.fwd(*args, True)
    du, ddelta, dA, dB, dC, dD, ddelta_bias, dz = selective_scan_cuda.bwd(
        *args, x["dout"], states, out, None, True, False)
    return {"out": gated, "du": du, "ddelta": ddelta, "dA": dA, "dB": dB.squeeze(1), "dC": dC.squeeze(1), "dD": dD,
            "ddelta_bias": ddelta_bias, "dz": dz}


def chunked_pass(x: dict[str, torch.Tensor], launch: LaunchConfig) -> dict[str, torch.Tensor]:
    args = {k: x[k] for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")}
    out, starts, totals = scan_forward(**args, launch=launch)
    grads = scan_backward(**args, dout=x["dout"], starts=starts, totals=totals, launch=launch)
    return {"out": out, **dict(zip(GRADIENTS, grads[:8]))}


def differences(ours: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> dict[str, float]:
    return {k: ((ours[k].float() - v.float()).abs().max() / v.float().abs().max()).item()
            for k, v in reference.items()}


def timings(x: dict[str, torch.Tensor], forward, backward, repeats: int) -> dict[str, dict]:
    state = forward()
    return {"forward": summary(cuda_time_ms(forward, repeats, warmup=2)),
            "backward": summary(cuda_time_ms(lambda: backward(state), repeats, warmup=2))}


def mamba_timings(x: dict[str, torch.Tensor], repeats: int) -> dict[str, dict]:
    import selective_scan_cuda

    args = [x[k] for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")]
    return timings(x, lambda: selective_scan_cuda.fwd(*args, True),
                   lambda s: selective_scan_cuda.bwd(*args, x["dout"], s[1], s[0], None, True, False), repeats)


def chunked_timings(x: dict[str, torch.Tensor], launch: LaunchConfig, repeats: int) -> dict[str, dict]:
    args = {k: x[k] for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")}
    return timings(x, lambda: scan_forward(**args, launch=launch),
                   lambda s: scan_backward(**args, dout=x["dout"], starts=s[1], totals=s[2], launch=launch), repeats)


def total_ms(t: dict[str, dict]) -> float:
    return t["forward"]["median_ms"] + t["backward"]["median_ms"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--chunks", type=int, nargs="+", default=[32, 64, 128])
    parser.add_argument("--channels", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--warps", type=int, nargs="+", default=[2, 4, 8])
    args = parser.parse_args()
    results = ResultFile(args.out, {"benchmark": "chunked_scan_speed", "d_state": D_STATE})
    launches = [LaunchConfig(c, ch, w) for c, ch, w in itertools.product(args.chunks, args.channels, args.warps)]
    for batch, dim, length in SHAPES:
        x = block_inputs(batch, dim, length, torch.bfloat16)
        x32 = block_inputs(batch, dim, length, torch.float32)
        reference, reference32 = mamba_pass(x), mamba_pass(x32)
        mamba = mamba_timings(x, args.repeats)
        print(f"{batch}x{dim}x{length}  mamba-ssm  fwd {mamba['forward']['median_ms']:.3f}  "
              f"bwd {mamba['backward']['median_ms']:.3f} ms", flush=True)
        entry = {"shape": {"batch": batch, "dim": dim, "length": length}, "mamba_ssm": mamba, "chunked": []}
        for launch in launches:
            ours = chunked_timings(x, launch, args.repeats)
            bf16, fp32 = differences(chunked_pass(x, launch), reference), differences(chunked_pass(x32, launch),
                                                                                    reference32)
            entry["chunked"].append({"launch": vars(launch), **ours, "speedup": total_ms(mamba) / total_ms(ours),
                                     "difference_bf16": bf16, "difference_fp32": fp32})
            print(f"  {launch}  fwd {ours['forward']['median_ms']:.3f}  bwd {ours['backward']['median_ms']:.3f}  "
                  f"x{total_ms(mamba) / total_ms(ours):.2f}  fp32 diff {max(fp32.values()):.1e}  "
                  f"bf16 diff {max(bf16.values()):.1e}", flush=True)
        results.add(entry)


if __name__ == "__main__":
    main()
