"""Whole-volume inference time of one BraTS case: 4 x 240 x 240 x 155, 128^3 windows, 50 % overlap, no TTA.

Times `nnmamba.inference.predict_labels` end to end as evaluation calls it: the image starts on
the CPU as float32, the label map ends on the CPU; bf16 autocast, channels_last_3d weights.
Issue target: <= 0.5 s per case.

    python benchmarks/inference_speed.py --out benchmarks/results/inference_speed.json
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from _common import ResultFile, cpu_time_ms, summary
from nnmamba.inference import predict_labels
from nnmamba.models import build_model

CASE_SHAPE = (4, 240, 240, 155)
PATCH = (128, 128, 128)


def window_count(shape: tuple[int, ...], patch: tuple[int, ...], overlap: float) -> int:
    """Windows MONAI's sliding window visits: ceil((size - patch) / stride) + 1 per axis."""
    count = 1
    for size, window in zip(shape, patch):
        stride = max(int(window * (1 - overlap)), 1)
        count *= -(-max(size - window, 0) // stride) + 1
    return count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--variants", nargs="+", default=["miccss", "baseline"])
    parser.add_argument("--sw-batch-sizes", nargs="+", type=int, default=[2, 4])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.backends.cudnn.benchmark = True
    results = ResultFile(args.out, {"benchmark": "inference_speed", "case_shape": CASE_SHAPE, "patch": PATCH,
                                    "overlap": 0.5, "mirror_axes": [], "amp": "bf16",
                                    "windows": window_count(CASE_SHAPE[1:], PATCH, 0.5)})
    image = torch.randn(*CASE_SHAPE)
    for variant in args.variants:
        torch.manual_seed(0)
        model = build_model("segmentation", variant, 4, 4).cuda().to(memory_format=torch.channels_last_3d).eval()
        for sw_batch in args.sw_batch_sizes:
            def run() -> None:
                predict_labels(model, image, PATCH, overlap=0.5, sw_batch_size=sw_batch, device="cuda",
                               amp_dtype=torch.bfloat16)

            timing = summary(cpu_time_ms(run, repeats=args.repeats, warmup=2))
            results.add({"variant": variant, "sw_batch_size": sw_batch, "case": timing})
            print(f"inference {variant:9s} sw_batch {sw_batch}: {timing['median_ms'] / 1e3:.3f} s per case", flush=True)


if __name__ == "__main__":
    main()
