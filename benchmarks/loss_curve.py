"""Accuracy guard for speed work: a short CPU training run whose loss curve must not move.

Trains a small segmentation network (miccss, 8 base channels, 32^3 patches, batch 2) for a few
dozen Adam steps on a learnable synthetic task (labels are bands of a smooth random image) and
writes the per-step losses. Run it on two checkouts (before / after an optimisation) and on two
seeds; `--compare` overlays the curves in a PNG and reports the largest before/after difference
next to the seed-to-seed difference (the noise it must stay within). With `--loader` the batches
come from the training loader (`make_patch_loader`) over a small synthetic BraTS dataset, the
guard for changes to patch sampling; the curves then differ step by step with the patches drawn,
so the mean of the last steps is compared too.

    PYTHONPATH=<checkout>:benchmarks python benchmarks/loss_curve.py --out curve_<label>.json
    python benchmarks/loss_curve.py --compare curve_main.json curve_branch.json --png loss_curves.png
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from collections.abc import Iterable
from dataclasses import asdict
from itertools import islice
from pathlib import Path

import torch

from _common import code_version, machine, max_relative_difference, paper_augmentation
from nnmamba.data.loading.augmentation import Augmentation
from nnmamba.ssm_kernels import SCAN_KERNELS, use_scan_kernels


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


FLIPS = Augmentation(flip_axes=(0, 1, 2), flip_p=0.5)


def loader_batches(steps: int, seed: int, augmentation: Augmentation) -> Iterable[dict[str, torch.Tensor]]:
    """`steps` batches of the training loader: 32^3 patches (batch 2) of 8 synthetic 4-channel BraTS cases."""
    from nnmamba.data.readers.brats import BRATS_LABELS, find_brats_cases
    from nnmamba.data.preprocessing.preprocess import prepare_dataset
    from nnmamba.data.loading.sampling import make_patch_loader
    from nnmamba.data.synthetic.brats import write_synthetic_brats
    from nnmamba.engine import repeat_batches

    root = Path(tempfile.mkdtemp(prefix="loss_curve_"))
    # The training loader unpacks cases into a cache keyed by their path; these paths are temporary.
    os.environ["NNMAMBA_UNPACKED_DIR"] = str(root / "unpacked")
    write_synthetic_brats(root / "raw", n_cases=8, shape=(48, 48, 40), seed=0)
    prepare_dataset(find_brats_cases(root / "raw"), root / "prepared", BRATS_LABELS, crop_margin=1, progress=False)
    cases = json.loads((root / "prepared" / "dataset.json").read_text())["cases"].values()
    loader = make_patch_loader([root / "prepared" / c["image"] for c in cases],
                               [root / "prepared" / c["label"] for c in cases], patch_size=(32, 32, 32), batch_size=2,
                               samples_per_volume=4, queue_length=16, label_probabilities={0: 1, 1: 1, 2: 1, 3: 1},
                               augmentation=augmentation, num_workers=0, seed=seed)
    return islice(repeat_batches(loader), steps)


def train_curve(seed: int, steps: int, amp: str, through_loader: bool, augmentation: Augmentation,
                device: torch.device) -> list[float]:
    from nnmamba.engine import amp_dtype, build_optimizer, train_epoch
    from nnmamba.losses import build_loss
    from nnmamba.models import build_model

    batches = (loader_batches(steps, seed + 100, augmentation) if through_loader
               else learnable_batches(steps, seed + 100))
    torch.manual_seed(seed)
    model = build_model("segmentation", "miccss", 4 if through_loader else 1, 4, base_channels=8,
                        blocks_per_stage=2).to(device)
    optimizer = build_optimizer(model, "adam", lr=2e-3, weight_decay=1e-3)
    loss_fn = build_loss("segmentation")
    return [train_epoch(model, iter([batch]), loss_fn, optimizer, 1, device, amp_dtype(amp)) for batch in batches]


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
    tail = max(1, len(before[seeds[0]]) // 4)
    for run in runs:
        means = {seed: sum(run["curves"][seed][-tail:]) / tail for seed in seeds}
        print(f"{run['code']}: mean loss of the last {tail} steps per seed", {s: round(m, 4) for s, m in means.items()})
    fig, ax = plt.subplots(figsize=(7, 4))
    for run, style in zip(runs, ("-", "--")):
        for seed in seeds:
            ax.plot(run["curves"][seed], style, label=f"{run['code']} seed {seed}")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (Dice + CE)")
    ax.set_title(f"miccss, {runs[0].get('device', 'cpu')}, {runs[0]['amp']}: before/after max diff {code_gap:.1e}, seeds {seed_gap:.1e}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--amp", default="none", help="none | bf16 (autocast)")
    parser.add_argument("--device", default="cpu", help="cpu | cuda")
    parser.add_argument("--scan-kernels", choices=SCAN_KERNELS, default="mamba-ssm",
                        help="on CUDA: the fused Mamba block's selective scan (nnmamba.ssm_kernels)")
    parser.add_argument("--loader", action="store_true", help="batches from make_patch_loader (synthetic BraTS)")
    parser.add_argument("--paper-augmentation", action="store_true",
                        help="with --loader: the paper profile's augmentation instead of flips only")
    parser.add_argument("--compare", nargs=2, type=Path, help="two curve files: before, after")
    parser.add_argument("--png", type=Path, default=Path("loss_curves.png"))
    args = parser.parse_args()
    if args.compare:
        compare(args.compare, args.png)
        return
    augmentation = paper_augmentation() if args.paper_augmentation else FLIPS
    device = torch.device(args.device)
    scan_kernels = use_scan_kernels(args.scan_kernels) if device.type == "cuda" else None
    curves = {str(seed): train_curve(seed, args.steps, args.amp, args.loader, augmentation, device)
              for seed in args.seeds}
    args.out.write_text(json.dumps({"benchmark": "loss_curve", "code": code_version(), "amp": args.amp,
                                    "device": args.device, "scan_kernels": scan_kernels,
                                    "loader": args.loader, "augmentation": asdict(augmentation) if args.loader else None,
                                    "steps": args.steps, "curves": curves, "machine": machine()}, indent=2))
    print({seed: [round(x, 4) for x in curve[::10]] for seed, curve in curves.items()})


if __name__ == "__main__":
    main()
