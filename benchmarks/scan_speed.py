"""The selective scan: PyTorch parallel scan vs the mamba-ssm CUDA kernel (GPU) and vs the sequential reference (CPU).

GPU (issue target: the torch scan within 20x of the kernel, forward + backward, same run):
B=2, D=128, L=32768, N=16, float32, with D, z, delta_bias and softplus as the Mamba block uses them.
Triton (`--triton`, issue #18's target: forward + backward >= 2.5x faster than mamba-ssm's kernels): the
training step's largest call, B=8, D=128, L=32768, N=16, bf16, nnmamba.selective_scan_triton vs mamba-ssm.
CPU (target: the parallel scan >= 50x the sequential reference): B=1, D=64, N=16, L=4096, forward
and forward + backward, with a sweep over `chunk_size` to show how the chunk length matters.

    python benchmarks/scan_speed.py --out benchmarks/results/scan_speed.json [--skip-gpu] [--skip-cpu] [--triton]
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import torch

from _common import ResultFile, cpu_time_ms, cuda_time_ms, summary
from nnmamba.ssm import cuda_kernels_available, selective_scan, selective_scan_sequential


def scan_inputs(batch: int, channels: int, d_state: int, length: int, device: str, seed: int = 0) -> dict:
    """Inputs in the ranges the Mamba block produces: delta before softplus, A = -(1..N)-like decays."""
    g = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, device=device)

    return {
        "u": randn(batch, channels, length), "delta": randn(batch, channels, length) * 0.5 - 3.0,
        "A": -torch.rand(channels, d_state, generator=g, device=device) * d_state, "B": randn(batch, d_state, length),
        "C": randn(batch, d_state, length), "D": randn(channels), "z": randn(batch, channels, length),
        "delta_bias": randn(channels) * 0.1,
    }


def forward_backward(scan: Callable[..., torch.Tensor], inputs: dict, **kwargs) -> Callable[[], None]:
    leaves = {k: v.detach().clone().requires_grad_() for k, v in inputs.items()}

    def run() -> None:
        out = scan(**leaves, delta_softplus=True, **kwargs)
        out.backward(torch.ones_like(out))

    return run


def forward_only(scan: Callable[..., torch.Tensor], inputs: dict, **kwargs) -> Callable[[], None]:
    def run() -> None:
        with torch.no_grad():
            scan(**inputs, delta_softplus=True, **kwargs)

    return run


def relative_error(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.double() - ref.double()).norm() / ref.double().norm()).item()


MODES = (("forward", forward_only), ("forward_backward", forward_backward))


def time_scans(entry: dict, scans: dict[str, Callable[..., torch.Tensor]], inputs: dict, repeats: int) -> None:
    """entry[f"{name}_{mode}"]: CUDA timings of each scan, forward and forward + backward, same inputs."""
    for mode, wrap in MODES:
        for name, scan in scans.items():
            entry[f"{name}_{mode}"] = summary(cuda_time_ms(wrap(scan, inputs), repeats=repeats, warmup=2))


def gpu_comparison(results: ResultFile, repeats: int) -> None:
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn

    torch.backends.cuda.matmul.allow_tf32 = False
    inputs = scan_inputs(2, 128, 16, 32768, "cuda")
    with torch.no_grad():
        error = relative_error(selective_scan(**inputs, delta_softplus=True),
                               selective_scan_fn(**inputs, delta_softplus=True))
    entry = {"where": "gpu", "shape": {"B": 2, "D": 128, "L": 32768, "N": 16}, "relative_error_torch_vs_cuda": error}
    time_scans(entry, {"torch": selective_scan, "cuda": selective_scan_fn}, inputs, repeats)
    for mode, _ in MODES:
        entry[f"ratio_{mode}"] = entry[f"torch_{mode}"]["median_ms"] / entry[f"cuda_{mode}"]["median_ms"]
        print(f"GPU {mode:17s} torch {entry[f'torch_{mode}']['median_ms']:8.2f} ms  cuda "
              f"{entry[f'cuda_{mode}']['median_ms']:6.3f} ms  ratio {entry[f'ratio_{mode}']:5.1f}x", flush=True)
    torch.cuda.reset_peak_memory_stats()
    forward_backward(selective_scan, inputs)()
    entry["torch_forward_backward_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    results.add(entry)


def triton_comparison(results: ResultFile, repeats: int) -> None:
    """mamba-ssm's kernels vs the Triton scan at the step's largest call, bf16 inputs, float32 A, D, bias."""
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn

    from nnmamba.selective_scan_triton import selective_scan_triton

    inputs = {key: value.to(torch.bfloat16) if value.dim() == 3 else value
              for key, value in scan_inputs(8, 128, 16, 32768, "cuda").items()}
    with torch.no_grad():
        error = relative_error(selective_scan_triton(**inputs, delta_softplus=True),
                               selective_scan_fn(**inputs, delta_softplus=True))
    entry = {"where": "gpu", "gpu": torch.cuda.get_device_name(), "dtype": "bf16",
             "shape": {"B": 8, "D": 128, "L": 32768, "N": 16}, "relative_error_triton_vs_cuda": error}
    time_scans(entry, {"triton": selective_scan_triton, "cuda": selective_scan_fn}, inputs, repeats)
    for mode, _ in MODES:
        entry[f"speedup_{mode}"] = entry[f"cuda_{mode}"]["median_ms"] / entry[f"triton_{mode}"]["median_ms"]
        print(f"GPU {mode:17s} triton {entry[f'triton_{mode}']['median_ms']:7.3f} ms  cuda "
              f"{entry[f'cuda_{mode}']['median_ms']:7.3f} ms  speed-up {entry[f'speedup_{mode}']:4.2f}x", flush=True)
    entry["kernels_ms"] = {name: kernel_times(forward_backward(scan, inputs), repeats)
                           for name, scan in (("triton", selective_scan_triton), ("cuda", selective_scan_fn))}
    for name, kernels in entry["kernels_ms"].items():
        print(f"GPU forward_backward {name} kernels (ms per call):",
              ", ".join(f"{k} {v:.3f}" for k, v in kernels.items()), flush=True)
    results.add(entry)


def kernel_times(call: Callable[[], object], repeats: int) -> dict[str, float]:
    """Each GPU kernel's time per `call` (ms), from torch.profiler, longest first: where a scan's time goes."""
    from torch.profiler import ProfilerActivity, profile

    call()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(repeats):
            call()
        torch.cuda.synchronize()
    times = {e.key[:60]: e.self_device_time_total / 1e3 / repeats for e in prof.key_averages()
             if e.self_device_time_total > 0}
    return dict(sorted(times.items(), key=lambda item: -item[1]))


def cpu_comparison(results: ResultFile, repeats: int, chunks: list[int | None]) -> None:
    inputs = scan_inputs(1, 64, 16, 4096, "cpu")
    entry = {"where": "cpu", "shape": {"B": 1, "D": 64, "L": 4096, "N": 16}, "threads": torch.get_num_threads()}
    for mode, wrap in (("forward", forward_only), ("forward_backward", forward_backward)):
        reference = summary(cpu_time_ms(wrap(selective_scan_sequential, inputs), repeats=max(1, repeats // 3), warmup=1))
        entry[f"sequential_{mode}"] = reference
        for chunk in chunks:
            timing = summary(cpu_time_ms(wrap(selective_scan, inputs, chunk_size=chunk), repeats=repeats, warmup=2))
            entry[f"parallel_{mode}_chunk_{chunk}"] = timing
            speedup = reference["median_ms"] / timing["median_ms"]
            entry[f"speedup_{mode}_chunk_{chunk}"] = speedup
            print(f"CPU {mode:17s} chunk {chunk!s:5s} parallel {timing['median_ms']:8.2f} ms  sequential "
                  f"{reference['median_ms']:8.1f} ms  speedup {speedup:5.1f}x", flush=True)
    results.add(entry)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--skip-gpu", action="store_true")
    parser.add_argument("--skip-cpu", action="store_true")
    parser.add_argument("--triton", action="store_true", help="also time nnmamba.selective_scan_triton (GPU)")
    parser.add_argument("--chunks", nargs="+", default=["None", "2048", "1024", "512", "256"])
    args = parser.parse_args()
    results = ResultFile(args.out, {"benchmark": "scan_speed"})
    if not args.skip_gpu and torch.cuda.is_available() and cuda_kernels_available():
        gpu_comparison(results, args.repeats)
        if args.triton:
            triton_comparison(results, args.repeats)
    if not args.skip_cpu:
        cpu_comparison(results, args.repeats, [None if c == "None" else int(c) for c in args.chunks])


if __name__ == "__main__":
    main()
