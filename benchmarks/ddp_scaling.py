"""Data-parallel training throughput of the segmentation network on 1..N GPUs of one host, without Ray.

Run once per GPU count under torchrun; every rank trains the paper's segmentation network (B=2 per
GPU, 1 x 128^3, 16 classes, bf16, channels_last_3d, NCCL DDP) on in-memory batches through
`nnmamba.engine.train_epoch`, and times its start-up phases. Rank 0 appends one entry to --out.
The Ray Train version of the same measurement is `ray_train_scaling.py`; this one separates
what DDP itself costs from what Ray adds.

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

from _common import machine
from _synthetic import synthetic_batches


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="JSON list, one entry per run appended")
    parser.add_argument("--variant", default="miccss")
    parser.add_argument("--warmup-steps", type=int, default=10)
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    phases = {"process_start": time.time()}
    from nnmamba.engine import build_optimizer, train_epoch
    from nnmamba.losses import build_loss
    from nnmamba.models import build_model
    from nnmamba.ssm import cuda_kernels_available

    phases["imports"] = time.time()
    local_rank = int(os.environ["LOCAL_RANK"])
    device = torch.device("cuda", local_rank)
    torch.cuda.set_device(device)
    torch.zeros(1, device=device)
    phases["cuda_context"] = time.time()
    assert cuda_kernels_available(), "the mamba-ssm kernels do not import"
    phases["kernels_import"] = time.time()
    dist.init_process_group("nccl", device_id=device)
    dist.all_reduce(torch.ones(1, device=device))
    phases["nccl_first_collective"] = time.time()
    torch.manual_seed(0)
    model = build_model("segmentation", args.variant, 1, 16).to(device, memory_format=torch.channels_last_3d)
    phases["model_on_gpu"] = time.time()
    model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[local_rank])
    phases["ddp_wrapped"] = time.time()
    torch.backends.cudnn.benchmark = True
    optimizer = build_optimizer(model.module, "adam", lr=2e-3, weight_decay=1e-3)
    batches = itertools.cycle(synthetic_batches(4, 2, 1, 16, (128, 128, 128), seed=dist.get_rank()))
    loss_fn = build_loss("segmentation")
    train_epoch(model, batches, loss_fn, optimizer, args.warmup_steps, device, torch.bfloat16, True)
    torch.cuda.synchronize()
    dist.barrier()
    phases["warmed_up"] = time.time()
    started = time.perf_counter()
    train_epoch(model, batches, loss_fn, optimizer, args.steps, device, torch.bfloat16, True)
    torch.cuda.synchronize()
    dist.barrier()
    elapsed = time.perf_counter() - started
    world = dist.get_world_size()
    all_phases = [None] * world
    dist.all_gather_object(all_phases, {k: round(v - phases["process_start"], 3) for k, v in phases.items()})
    if dist.get_rank() == 0:
        entries = json.loads(args.out.read_text()) if args.out.exists() else []
        entries.append({"gpus": world, "variant": args.variant, "batch_per_gpu": 2, "steps": args.steps,
                        "seconds": elapsed, "samples_per_s": world * 2 * args.steps / elapsed,
                        "step_ms": elapsed / args.steps * 1e3, "phases_s_since_process_start": all_phases,
                        "machine": machine()})
        args.out.write_text(json.dumps(entries, indent=2, default=str))
        print(f"DDP {world} GPU(s): {entries[-1]['samples_per_s']:.1f} samples/s, {entries[-1]['step_ms']:.1f} ms/step;"
              f" rank-0 phases {all_phases[0]}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
