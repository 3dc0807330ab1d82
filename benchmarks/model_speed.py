"""GPU speed and size of every nnMamba variant and every competitor backbone at the paper's input shapes.

For each task in SHAPES, each row of its tables (nnMamba's registered variants, then the task's
competitor backbones of `nnmamba.backbones`, in the same run, so they compare), and each shape:
parameters, multiply-adds, train step time (forward, loss, backward, Adam step, through
`nnmamba.engine.train_epoch`, the loop the pipeline trains with), inference time (forward of one
batch in eval mode) and peak GPU memory during training. Variants and backbones registered later
are picked up without editing this file.

Multiply-adds: `nnmamba.complexity.count_macs` (torch.utils.flop_counter: convolutions, linear
layers and matrix products, halved), one sample, on the benchmarked GPU model: with the mamba-ssm
kernels the SSM's four projections are counted, its depthwise conv1d and the scan (custom CUDA
kernels) are not, as thop/fvcore would count them; norms and activations are not counted.

    python benchmarks/model_speed.py --out benchmarks/results/model_speed.json --configs bf16-cl fp32
"""

from __future__ import annotations

import argparse
import itertools
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from _common import ResultFile, cuda_time_ms, summary
from nnmamba.backbones import BACKBONES, NNMAMBA, build_network, get_backbone
from nnmamba.complexity import count_macs
from nnmamba.engine import CAPTURE_WARMUP_STEPS, CapturedTrainStep, build_optimizer, train_epoch
from nnmamba.losses import build_loss
from nnmamba.models import available_variants, count_parameters
from nnmamba.ssm_kernels import SCAN_KERNELS, use_scan_kernels


@dataclass(frozen=True)
class Shape:
    """One benchmark input: `batch` samples of `in_channels` x `spatial`, `out_channels` outputs."""

    name: str
    batch: int
    in_channels: int
    out_channels: int
    spatial: tuple[int, ...] = (128, 128, 128)


# The paper's settings: AMOS-style segmentation (1 channel, 16 classes), BraTS (4 modalities,
# 4 outputs), the six fetal landmarks (heatmaps), ADNI classification (1 channel, AD vs NC); batch 2
# as in training.
SHAPES: dict[str, list[Shape]] = {
    "segmentation": [Shape("amos", 2, 1, 16), Shape("brats", 2, 4, 4)],
    "landmark": [Shape("fetal", 2, 1, 6)],
    "classification": [Shape("adni", 2, 1, 2)],
}


def table_rows(task: str) -> list[tuple[str, str | None]]:
    """(backbone, nnMamba variant) of every row: nnMamba's variants, then the task's competitors."""
    return [(NNMAMBA, v) for v in available_variants(task)] + [(b, None) for b in BACKBONES.get(task, {})]


def row_name(backbone: str, variant: str | None) -> str:
    return variant if backbone == NNMAMBA else backbone


@dataclass(frozen=True)
class Config:
    """How the network runs: precision, memory format, torch.compile, CUDA-graph replay of the train step."""

    precision: str = "bf16"
    channels_last: bool = True
    compile: bool = False
    graph: bool = False

    @classmethod
    def parse(cls, text: str) -> Config:
        parts = text.split("-")
        if parts[0] not in ("fp32", "bf16") or not set(parts[1:]) <= {"cl", "compile", "graph"}:
            raise ValueError(f"config {text!r}: expected fp32|bf16 followed by -cl, -compile and/or -graph")
        return cls(parts[0], "cl" in parts[1:], "compile" in parts[1:], "graph" in parts[1:])

    @property
    def dtype(self) -> torch.dtype | None:
        return torch.bfloat16 if self.precision == "bf16" else None

    def __str__(self) -> str:
        flags = [self.channels_last and "cl", self.compile and "compile", self.graph and "graph"]
        return "-".join([self.precision, *(f for f in flags if f)])


def loss_for(task: str) -> nn.Module:
    """The task's training loss (landmarks: the pipeline's default heatmap foreground weight)."""
    return build_loss(task, **({"foreground_weight": 10.0} if task == "landmark" else {}))


def synthetic_batch(task: str, shape: Shape, device: torch.device) -> dict[str, torch.Tensor]:
    """Random image and targets as the task's loader gives them: a label map, heatmaps, or one class per sample."""
    image = torch.randn(shape.batch, shape.in_channels, *shape.spatial, device=device)
    if task == "landmark":
        return {"image": image, "label": torch.rand(shape.batch, shape.out_channels, *shape.spatial, device=device)}
    label_shape = (shape.batch, 1, *shape.spatial) if task == "segmentation" else (shape.batch,)
    return {"image": image, "label": torch.randint(0, shape.out_channels, label_shape, device=device)}


def model_size(model: nn.Module, shape: Shape) -> dict[str, float]:
    macs = count_macs(model, (1, shape.in_channels, *shape.spatial))
    return {"parameters_m": count_parameters(model) / 1e6, "gmacs_per_sample": macs / 1e9}


def build_options(task: str, backbone: str) -> dict[str, object]:
    """Backbones planned from the voxel spacing (nnU-Net, U-Mamba) get 1 mm isotropic, as AMOS and BraTS
    are resampled to and as their reference parameter counts assume."""
    needs_spacing = backbone != NNMAMBA and get_backbone(task, backbone).needs_spacing
    return {"spacing": (1.0, 1.0, 1.0)} if needs_spacing else {}


def prepared(task: str, row: tuple[str, str | None], shape: Shape, config: Config, device: torch.device):
    """Model (seeded), optimizer, loss and the step runner a training loop would use for this config.

    Every row trains with nnMamba's optimizer here, so the step times compare the networks alone.
    """
    torch.manual_seed(0)
    model = build_network(task, *row, shape.in_channels, shape.out_channels, shape.spatial,
                          **build_options(task, row[0])).to(device)
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last_3d)
    optimizer = build_optimizer(model, "adam", lr=2e-3, weight_decay=1e-3, capturable=config.graph)
    runner = torch.compile(model) if config.compile else model
    loss_fn = loss_for(task)
    captured = CapturedTrainStep(runner, loss_fn, optimizer, config.dtype) if config.graph else None
    return model, runner, optimizer, loss_fn, captured


def losses(runner, loss_fn, optimizer, captured, batches: list[dict], config: Config, device) -> list[float]:
    """Per-step training losses over `batches`."""
    return [train_epoch(runner, iter([b]), loss_fn, optimizer, 1, device, config.dtype, config.channels_last,
                        captured) for b in batches]


def graph_matches_eager(task: str, row: tuple[str, str | None], shape: Shape, config: Config,
                        replays: int = 3) -> float:
    """Largest relative difference between the losses of eager and graph-replayed training from the same start.

    The graph run's first CAPTURE_WARMUP_STEPS steps are eager, the next one is captured, so the
    comparison runs `replays` steps past those.
    """
    steps = CAPTURE_WARMUP_STEPS + 1 + replays
    device = torch.device("cuda")
    eager_config = Config(config.precision, config.channels_last, config.compile, graph=False)
    generator = torch.Generator(device=device).manual_seed(1)
    batches = [{"image": torch.randn(shape.batch, shape.in_channels, *shape.spatial, device=device,
                                     generator=generator),
                "label": torch.randint(0, shape.out_channels, (shape.batch, 1, *shape.spatial), device=device,
                                       generator=generator)} for _ in range(steps)]
    curves = []
    for cfg in (eager_config, config):
        _, runner, optimizer, loss_fn, captured = prepared(task, row, shape, cfg, device)
        curves.append(losses(runner, loss_fn, optimizer, captured, batches, cfg, device))
    return max(abs(a - b) / abs(a) for a, b in zip(*curves))


def measure(task: str, row: tuple[str, str | None], shape: Shape, config: Config, steps: int, repeats: int,
            host_batches: str = "none") -> dict:
    """Train-step and inference timings of one (row, shape, config) on the current GPU.

    `host_batches` "pageable" or "pinned" keeps the batch in host memory, so every step also
    copies it to the GPU, as a training loop fed by a DataLoader does; "none" keeps it on the GPU.
    """
    device = torch.device("cuda")
    model, runner, optimizer, loss_fn, captured = prepared(task, row, shape, config, device)
    size = model_size(model, shape)
    batch = synthetic_batch(task, shape, device)
    if host_batches != "none":
        batch = {key: value.cpu() for key, value in batch.items()}
        batch = {key: value.pin_memory() for key, value in batch.items()} if host_batches == "pinned" else batch
    batches = itertools.repeat(batch)

    def train(n: int) -> None:
        train_epoch(runner, batches, loss_fn, optimizer, n, device, config.dtype, config.channels_last, captured)

    # Peak memory counts from the first step after the eager warm-up (which includes cuDNN's
    # algorithm search): with a CUDA graph that is the captured step, whose activations then
    # stay reserved in the graph's private pool (also reported).
    started = time.perf_counter()
    train(captured.warmup_left if captured else 1)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    train(2 if captured else 1)
    torch.cuda.synchronize()
    first_steps_s = time.perf_counter() - started
    step_times = [t / steps for t in cuda_time_ms(lambda: train(steps), repeats=repeats, warmup=1)]
    peak = torch.cuda.max_memory_allocated() / 2**30
    reserved = torch.cuda.memory_reserved() / 2**30

    image = batch["image"].to(device)
    image = image.contiguous(memory_format=torch.channels_last_3d) if config.channels_last else image
    runner.eval()

    def infer() -> None:
        with torch.inference_mode(), torch.autocast("cuda", dtype=config.dtype, enabled=config.dtype is not None):
            runner(image)

    infer_times = cuda_time_ms(infer, repeats=max(5, repeats * 2), warmup=2)
    return {**size, "train_step": summary(step_times), "inference": summary(infer_times), "peak_memory_gib": peak,
            "reserved_memory_gib": reserved, "first_steps_s": first_steps_s, "steps_per_timing": steps}


def profile_train_step(task: str, row: tuple[str, str | None], shape: Shape, config: Config, out_dir: Path) -> None:
    """torch.profiler tables (by GPU time; by operator and input shapes) of a few train steps."""
    from torch.profiler import ProfilerActivity, profile

    device = torch.device("cuda")
    model, runner, optimizer, loss_fn, captured = prepared(task, row, shape, config, device)
    batches = itertools.repeat(synthetic_batch(task, shape, device))
    train_epoch(runner, batches, loss_fn, optimizer, 5, device, config.dtype, config.channels_last, captured)
    torch.cuda.synchronize()
    steps = 5
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof:
        train_epoch(runner, batches, loss_fn, optimizer, steps, device, config.dtype, config.channels_last, captured)
        torch.cuda.synchronize()
    averages = prof.key_averages()
    name = f"profile_{task}_{row_name(*row)}_{shape.name}_{config}"
    table = averages.table(sort_by="self_cuda_time_total", row_limit=60, max_name_column_width=90)
    gpu_us = sum(e.self_device_time_total for e in averages if e.device_type.name == "CUDA") / steps
    by_shape = prof.key_averages(group_by_input_shape=True).table(sort_by="self_cuda_time_total", row_limit=50,
                                                                  max_name_column_width=40, max_shapes_column_width=90)
    (out_dir / f"{name}.txt").write_text(f"GPU kernel time per step: {gpu_us / 1e3:.2f} ms\n\n{table}\n\n"
                                         f"By operator and input shapes:\n{by_shape}\n")
    print(f"{name}: GPU kernel time per step {gpu_us / 1e3:.2f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="JSON results file")
    parser.add_argument("--configs", nargs="+", default=["bf16-cl"], help="e.g. bf16-cl fp32 bf16-cl-compile")
    parser.add_argument("--tasks", nargs="+", default=list(SHAPES))
    parser.add_argument("--rows", nargs="+", default=None,
                        help="only these rows: nnMamba variants and/or backbone names (default: all registered)")
    parser.add_argument("--shapes", nargs="+", default=None, help="only these shape names (default: all)")
    parser.add_argument("--steps", type=int, default=10, help="train steps per timing")
    parser.add_argument("--repeats", type=int, default=3, help="timings per measurement (median reported)")
    parser.add_argument("--host-batches", choices=["none", "pageable", "pinned"], default="none",
                        help="keep the batch in host memory (each step copies it to the GPU)")
    parser.add_argument("--check-graph", action="store_true", help="compare graph-replayed and eager losses")
    parser.add_argument("--profile", type=Path, default=None, help="write a profiler table of each miccss run here")
    parser.add_argument("--scan-kernels", choices=SCAN_KERNELS, default="mamba-ssm",
                        help="the selective-scan kernels of the fused Mamba block (nnmamba.ssm_kernels)")
    args = parser.parse_args()

    torch.backends.cudnn.benchmark = True
    scan_kernels = use_scan_kernels(args.scan_kernels)
    configs = [Config.parse(c) for c in args.configs]
    results = ResultFile(args.out, {"benchmark": "model_speed", "steps": args.steps, "repeats": args.repeats,
                                    "shapes": {t: [asdict(s) for s in v] for t, v in SHAPES.items()}})
    for task in args.tasks:
        for shape, config, row in itertools.product(SHAPES[task], configs, table_rows(task)):
            name = row_name(*row)
            if (args.rows and name not in args.rows) or (args.shapes and shape.name not in args.shapes):
                continue
            entry = {"task": task, "backbone": row[0], "variant": name, "shape": shape.name, "config": str(config),
                     "host_batches": args.host_batches, "scan_kernels": scan_kernels,
                     **measure(task, row, shape, config, args.steps, args.repeats, args.host_batches)}
            torch.cuda.empty_cache()  # the measured model is gone with measure()'s frame
            if config.graph and args.check_graph:
                entry["graph_vs_eager_max_relative_loss_difference"] = graph_matches_eager(task, row, shape, config)
            results.add(entry)
            print(f"{task:14s} {shape.name:6s} {name:9s} {config!s:16s} step {entry['train_step']['median_ms']:7.1f} ms"
                  f"  scan {scan_kernels}"
                  f"  infer {entry['inference']['median_ms']:6.1f} ms  peak {entry['peak_memory_gib']:5.2f} GiB"
                  f"  {entry['parameters_m']:6.2f} M  {entry['gmacs_per_sample']:7.1f} GMAC", flush=True)
            if args.profile and name == "miccss":
                args.profile.mkdir(parents=True, exist_ok=True)
                profile_train_step(task, row, shape, config, args.profile)


if __name__ == "__main__":
    main()
