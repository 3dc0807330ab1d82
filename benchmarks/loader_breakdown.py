"""Where a loader worker's time goes, per BraTS-size volume: alone and with as many workers as CPUs.

The steps of one `nnmamba.data.loading.array_patches.ArrayPatchDataset` item (`samples_per_volume`
patches of one case), timed one by one on cases written by `loader_speed.write_case`: unpacking
(once per case, not per visit), the whole item with the paper profile's augmentation, and its
parts: label-weighted draw, plain crops, patch resampling forced on every patch (the item does it
with p = 0.2), the torchio patch transforms (flips, gamma, noise), collation into batches of 2.
Once in this process, then once per case in a pool of `--parallel` processes at the same time,
which shows what contention for cores and memory bandwidth does to each step.

    python benchmarks/loader_breakdown.py --out benchmarks/results/loader_breakdown.json --parallel 16
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from _common import ResultFile
from loader_speed import (AUGMENTATION, BATCH, LABEL_PROBABILITIES, PATCH, SAMPLES_PER_VOLUME, SHAPE,
                          write_case)
from nnmamba.data.loading.array_patches import ArrayPatchDataset, affine_matrix, draw_voxels, read_region, resample_patch
from nnmamba.data.loading.sampling import collate_patches
from nnmamba.data.loading.unpacked import unpack_case


def step_times(paths: tuple[Path, Path]) -> dict[str, float]:
    """Seconds per step for one volume, single-threaded torch as in a DataLoader worker."""
    torch.set_num_threads(1)
    times: dict[str, float] = {}

    def timed(name: str, fn):
        started = time.perf_counter()
        result = fn()
        times[name] = time.perf_counter() - started
        return result

    unpacked_dir = paths[0].parent / "unpacked"
    case = timed("unpack_once", lambda: unpack_case("case", *paths, unpacked_dir))
    dataset = ArrayPatchDataset([("case", *paths)], unpacked_dir, PATCH, SAMPLES_PER_VOLUME, LABEL_PROBABILITIES,
                                AUGMENTATION)
    patches = timed("item", lambda: dataset[0])
    image, label = np.load(case.image, mmap_mode="c"), np.load(case.label, mmap_mode="r")
    voxels = timed("draw", lambda: draw_voxels(case, np.load(case.voxels_by_label, mmap_mode="r"),
                                               LABEL_PROBABILITIES, SAMPLES_PER_VOLUME))
    origins = np.clip(voxels - np.asarray(PATCH) // 2, 0, np.asarray(SHAPE) - PATCH)
    timed("crops", lambda: [(read_region(image, o, o + PATCH), read_region(label, o, o + PATCH)) for o in origins])
    timed("forced_affine", lambda: [resample_patch(image, label, o, np.asarray(PATCH),
                                                   affine_matrix(dataset.affine, case.spacing)) for o in origins])
    timed("patch_transforms", lambda: [dataset.patch_transform(patch) for patch in patches])
    timed("collate", lambda: [collate_patches(patches[i:i + BATCH]) for i in range(0, len(patches), BATCH)])
    return times


def mean_times(runs: list[dict[str, float]]) -> dict[str, float]:
    return {name: statistics.mean(run[name] for run in runs) for name in runs[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--parallel", type=int, default=16, help="processes timed at the same time (the workers)")
    parser.add_argument("--suffix", default=".nii.gz")
    args = parser.parse_args()
    directory = Path(tempfile.mkdtemp(prefix="loader_breakdown_"))
    with ProcessPoolExecutor(args.parallel) as pool:
        cases = list(pool.map(write_case, itertools.repeat(directory), range(args.parallel),
                              itertools.repeat(args.suffix)))
    results = ResultFile(args.out, {"benchmark": "loader_breakdown", "volume": [4, *SHAPE], "patch": list(PATCH),
                                    "samples_per_volume": SAMPLES_PER_VOLUME, "batch": BATCH,
                                    "augmentation": asdict(AUGMENTATION), "suffix": args.suffix, "unit": "s per volume"})
    alone = mean_times([step_times(case) for case in cases[:2]])
    results.add({"processes": 1, **alone})
    print("alone   ", {k: round(v, 3) for k, v in alone.items()}, flush=True)
    with ProcessPoolExecutor(args.parallel) as pool:
        started = time.perf_counter()
        runs = list(pool.map(step_times, cases))
        wall = time.perf_counter() - started
    together = mean_times(runs)
    results.add({"processes": args.parallel, "wall_s": wall, **together})
    print(f"{args.parallel:2d} at once", {k: round(v, 3) for k, v in together.items()}, flush=True)


if __name__ == "__main__":
    main()
