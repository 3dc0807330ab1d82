"""What every benchmark records next to its numbers: the machine, the code, and how it was timed."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import yaml

if TYPE_CHECKING:
    from nnmamba.data.loading.augmentation import Augmentation

REPO = Path(__file__).resolve().parent.parent


def machine() -> dict[str, Any]:
    """GPU, CPU and library versions: a figure without its machine is not a result."""
    info: dict[str, Any] = {
        "cpu_count": os.cpu_count(),
        "cpu": platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version())
    for package in ("mamba_ssm", "causal_conv1d", "monai", "torchio"):
        try:
            info[package] = __import__(package).__version__
        except (ImportError, AttributeError, OSError):
            info[package] = None
    return info


def paper_augmentation() -> Augmentation:
    """The augmentation of params.yaml's ``paper`` profile: the benchmarks time the paper's setting.

    nnmamba is imported here, not at the top: some benchmarks import this module before the repo is on sys.path.
    """
    from nnmamba.data.loading.augmentation import Augmentation

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    section = params["profiles"]["paper"]["train"]["augmentation"]
    return Augmentation(**{k: tuple(v) if isinstance(v, list) else v for k, v in section.items()})


def code_version() -> str:
    """The git commit of the code under test, or the label the caller gives it (copies without .git)."""
    label = os.environ.get("NNMAMBA_CODE_LABEL")
    if label:
        return label
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def cuda_time_ms(fn: Callable[[], Any], repeats: int, warmup: int) -> list[float]:
    """Wall time of each call in ms between CUDA events (device work included), after `warmup` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop))
    return times


def cpu_time_ms(fn: Callable[[], Any], repeats: int, warmup: int) -> list[float]:
    """Wall time of each call in ms on the host clock, after `warmup` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return times


def max_relative_difference(reference: Sequence[float], other: Sequence[float]) -> float:
    """Largest |other - reference| / |reference| over paired values: how far one loss curve strays from another."""
    return max(abs(o - r) / abs(r) for r, o in zip(reference, other))


def stamp_cuda_start(phases: dict[str, float], device: torch.device) -> bool:
    """Create the CUDA context and import the mamba-ssm kernels, stamping each in `phases` (wall clock).

    Start-up phases of a training process, timed the same way with or without Ray. Returns
    whether the kernels imported; without them "kernels_import" is NaN.
    """
    torch.zeros(1, device=device)
    phases["cuda_context"] = time.time()
    from nnmamba.ssm import cuda_kernels_available

    available = cuda_kernels_available()
    phases["kernels_import"] = time.time() if available else float("nan")
    return available


def stamp_first_collective(phases: dict[str, float], device: torch.device) -> None:
    """One all-reduce, where a process group exists, stamped "nccl_first_collective": NCCL sets up its
    communicators on the first collective, not when the group is created."""
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(torch.ones(1, device=device))
    phases["nccl_first_collective"] = time.time()


def seconds_since(phases: dict[str, Any], origin: str) -> dict[str, float]:
    """The timestamps among `phases`, in seconds after phases[origin] (ms resolution)."""
    return {k: round(v - phases[origin], 3) for k, v in phases.items() if isinstance(v, float)}


def summary(times: list[float]) -> dict[str, float]:
    return {"median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times), "n": len(times)}


class ResultFile:
    """A JSON results file rewritten after every entry, so a run cut short keeps what it measured."""

    def __init__(self, path: Path, header: dict[str, Any]):
        self.path = Path(path)
        self.payload = {**header, "machine": machine(), "code": code_version(), "results": []}
        self.write()

    def add(self, entry: dict[str, Any]) -> None:
        self.payload["results"].append(entry)
        self.write()

    def write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.payload, indent=2, default=str) + "\n")
        tmp.replace(self.path)
