"""Accuracy guard for speed work: a short CPU training run whose loss curve must not move.

Trains a small segmentation network (miccss, 8 base channels, 32^3 patches, batch 2) for a few
dozen Adam steps on a learnable synthetic task (labels are bands of a smooth random image) and
writes the per-step losses. Run it on two checkouts (before / after an optimisation) and on two
seeds; `--compare` overlays the curves in a PNG and reports the largest before/after difference
next to the seed-to-seed difference (the noise it must stay within).

    PYTHONPATH=<checkout>:benchmarks python benchmarks/loss_curve.py --out curve_<label>.json
    python benchmarks/loss_curve.py --compare curve_main.json curve_branch.json --png loss_curves.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from _common import code_version, machine, max_relative_difference


def learnable_batches(steps: int, seed: int, classes: int = 4, size: int = 32) -> list[dict[str, torch.Tensor]]:
    """Smooth random images; the label of a voxel is the band (of `classes`) its intensity falls in."""
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(steps):
        coarse = torch.randn(2, 1, size // 8, size // 8, size // 8, generator=generator)
        image = torch.nn.functional.interpolate(coarse, size=(size,) * 3, mode="trilinear", align_corners=False)
        edges = torch.tensor([-0.5, 0.0, 0.5])[: classes - 1]
        batches.append({"image": image, "label": torch.bucketize(image, edges)})
    return batches


def train_curve(seed: int, steps: int, amp: str) -> list[float]:
    from nnmamba.engine import amp_dtype, build_optimizer, train_epoch
    from nnmamba.losses import build_loss
    from nnmamba.models import build_model

    torch.manual_seed(seed)
    model = build_model("segmentation", "miccss", 1, 4, base_channels=8, blocks_per_stage=2)
    optimizer = build_optimizer(model, "adam", lr=2e-3, weight_decay=1e-3)
    loss_fn, device = build_loss("segmentation"), torch.device("cpu")
    return [train_epoch(model, iter([batch]), loss_fn, optimizer, 1, device, amp_dtype(amp))
            for batch in learnable_batches(steps, seed + 100)]


def compare(paths: list[Path], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [json.loads(p.read_text()) for p in paths]
    before, after = runs[0]["curves"], runs[1]["curves"]
    seeds = sorted(before, key=int)

    code_gap = max(max_relative_difference(before[s], after[s]) for s in seeds)
    seed_gap = max_relative_difference(before[seeds[0]], before[seeds[1]]) if len(seeds) > 1 else float("nan")
    print(f"largest relative loss difference {runs[0]['code']} -> {runs[1]['code']}: {code_gap:.2e} "
          f"(seed {seeds[0]} vs {seeds[-1]}: {seed_gap:.2e})")
    fig, ax = plt.subplots(figsize=(7, 4))
    for run, style in zip(runs, ("-", "--")):
        for seed in seeds:
            ax.plot(run["curves"][seed], style, label=f"{run['code']} seed {seed}")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (Dice + CE)")
    ax.set_title(f"miccss, CPU, {runs[0]['amp']}: before/after max diff {code_gap:.1e}, seeds {seed_gap:.1e}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--amp", default="none", help="none | bf16 (CPU autocast)")
    parser.add_argument("--compare", nargs=2, type=Path, help="two curve files: before, after")
    parser.add_argument("--png", type=Path, default=Path("loss_curves.png"))
    args = parser.parse_args()
    if args.compare:
        compare(args.compare, args.png)
        return
    curves = {str(seed): train_curve(seed, args.steps, args.amp) for seed in args.seeds}
    args.out.write_text(json.dumps({"benchmark": "loss_curve", "code": code_version(), "amp": args.amp,
                                    "steps": args.steps, "curves": curves, "machine": machine()}, indent=2))
    print({seed: [round(x, 4) for x in curve[::10]] for seed, curve in curves.items()})


if __name__ == "__main__":
    main()
