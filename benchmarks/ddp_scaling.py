"""Data-parallel training throughput of the segmentation network on 1..N GPUs of one host, without Ray.

Run once per GPU count under torchrun; every rank trains the paper's segmentation network (B=2 per
GPU, 1 x 128^3, 16 classes, bf16, channels_last_3d, NCCL DDP with `nnmamba.engine.DDP_OPTIONS`,
as the Ray worker wraps it) on in-memory batches through
`nnmamba.engine.train_epoch`, once per mode: "eager" (kernels launched from Python) and "graph"
(the whole DDP step, all-reduces included, replayed as a CUDA graph by `CapturedTrainStep`).
Each mode starts from the same initial weights and batches, so the per-step losses of its first
`--check-steps` steps can be compared across modes (the graph replays must match eager training up
to bf16 noise). Rank 0 appends one entry to --out. The Ray Train version of the same measurement is
`ray_train_scaling.py`; this one separates what DDP itself costs from what Ray adds.

    torchrun --standalone --nproc_per_node=2 benchmarks/ddp_scaling.py --out results.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

from _common import (code_version, machine, max_relative_difference, seconds_since, stamp_cuda_start,
                     stamp_first_collective)
from _synthetic import BATCH, CLASSES, IN_CHANNELS, segmentation_batches


def run_mode(graphed: bool, local_rank: int, variant: str, check_steps: int, steps: int) -> dict:
    """Train a freshly seeded model `check_steps` steps (losses recorded one by one), then time `steps` more."""
    from nnmamba.engine import DDP_OPTIONS, CapturedTrainStep, build_optimizer, capture_ready_stream, train_epoch
    from nnmamba.losses import build_loss
    from nnmamba.models import build_model

    device = torch.device("cuda", local_rank)
    torch.manual_seed(0)
    model = build_model("segmentation", variant, IN_CHANNELS, CLASSES).to(device, memory_format=torch.channels_last_3d)
    with capture_ready_stream(device, enabled=graphed):
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[local_rank], **DDP_OPTIONS)
    optimizer = build_optimizer(model.module, "adam", lr=2e-3, weight_decay=1e-3, capturable=graphed)
    loss_fn = build_loss("segmentation")
    captured = CapturedTrainStep(model, loss_fn, optimizer, torch.bfloat16) if graphed else None
    batches = itertools.cycle(segmentation_batches(seed=dist.get_rank()))

    def train(n: int) -> float:
        return train_epoch(model, batches, loss_fn, optimizer, n, device, torch.bfloat16, True, captured)

    losses = [train(1) for _ in range(check_steps)]
    torch.cuda.synchronize()
    dist.barrier()
    started = time.perf_counter()
    train(steps)
    torch.cuda.synchronize()
    dist.barrier()
    elapsed = time.perf_counter() - started
    world = dist.get_world_size()
    return {"losses": losses, "seconds": elapsed, "samples_per_s": world * BATCH * steps / elapsed,
            "step_ms": elapsed / steps * 1e3}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="JSON list, one entry per run appended")
    parser.add_argument("--variant", default="miccss")
    parser.add_argument("--modes", nargs="+", choices=["eager", "graph"], default=["eager", "graph"])
    parser.add_argument("--check-steps", type=int, default=16,
                        help="steps with recorded losses before timing (the graph is captured after 11)")
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    phases = {"process_start": time.time()}
    import nnmamba.ssm  # noqa: F401  (the library's own import, stamped as a phase of its own)

    phases["imports"] = time.time()
    local_rank = int(os.environ["LOCAL_RANK"])
    device = torch.device("cuda", local_rank)
    torch.cuda.set_device(device)
    kernels = stamp_cuda_start(phases, device)
    assert kernels, "the mamba-ssm kernels do not import"
    dist.init_process_group("nccl", device_id=device)
    stamp_first_collective(phases, device)
    torch.backends.cudnn.benchmark = True
    modes = {mode: run_mode(mode == "graph", local_rank, args.variant, args.check_steps, args.steps)
             for mode in args.modes}
    world = dist.get_world_size()
    all_phases = [None] * world
    dist.all_gather_object(all_phases, seconds_since(phases, "process_start"))
    if dist.get_rank() == 0:
        entry = {"gpus": world, "variant": args.variant, "batch_per_gpu": BATCH, "steps": args.steps,
                 "modes": modes, "phases_s_since_process_start": all_phases, "machine": machine(),
                 "code": code_version(),
                 "env": {k: os.environ.get(k) for k in ("TORCH_NCCL_ASYNC_ERROR_HANDLING", "NCCL_NVLS_ENABLE")}}
        if {"eager", "graph"} <= modes.keys():
            entry["max_rel_loss_diff_graph_vs_eager"] = max_relative_difference(modes["eager"]["losses"],
                                                                                modes["graph"]["losses"])
        entries = json.loads(args.out.read_text()) if args.out.exists() else []
        entries.append(entry)
        args.out.write_text(json.dumps(entries, indent=2, default=str))
        summary = {mode: f"{r['samples_per_s']:.1f} samples/s, {r['step_ms']:.1f} ms/step" for mode, r in modes.items()}
        print(f"DDP {world} GPU(s): {summary}; max rel loss diff graph vs eager "
              f"{entry.get('max_rel_loss_diff_graph_vs_eager')}; rank-0 phases {all_phases[0]}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
