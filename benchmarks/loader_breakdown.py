"""Where a loader worker's time goes, per BraTS-size volume: alone and with as many workers as CPUs.

The steps of one `nnmamba.data.sampling.PatchDrawingDataset` item, timed one by one on cases
written by `loader_speed.write_case`: read image + label, pad, the paper profile's augmentation
(random: it includes the affine with p = 0.2), draw `samples_per_volume` label-weighted patches,
collate them into batches of 2. Once in this process, then once per case in a pool of
`--parallel` processes at the same time, which shows what contention for cores and memory
bandwidth does to each step. A forced RandomAffine is timed too (the step the augmentation runs
at p = 0.2).

    python benchmarks/loader_breakdown.py --out benchmarks/results/loader_breakdown.json --parallel 16
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch
import torchio as tio

from _common import ResultFile
from loader_speed import (AUGMENTATION, BATCH, LABEL_PROBABILITIES, PATCH, SAMPLES_PER_VOLUME, SHAPE,
                          write_case)
from nnmamba.data.sampling import ContainingLabelSampler, augmentation_transform, collate_patches


def step_times(paths: tuple[Path, Path]) -> dict[str, float]:
    """Seconds per step for one volume, single-threaded torch as in a DataLoader worker."""
    torch.set_num_threads(1)
    times: dict[str, float] = {}

    def timed(name: str, fn):
        started = time.perf_counter()
        result = fn()
        times[name] = time.perf_counter() - started
        return result

    subject = tio.Subject(image=tio.ScalarImage(paths[0]), label=tio.LabelMap(paths[1]), case_id="case")
    timed("read", subject.load)
    subject = timed("pad", lambda: tio.CropOrPad(PATCH, only_pad=True)(subject))
    timed("forced_affine", lambda: tio.RandomAffine(scales=0.1, degrees=10, default_pad_value=0)(subject))
    subject = timed("augmentation", lambda: augmentation_transform(AUGMENTATION)(subject))
    sampler = ContainingLabelSampler(PATCH, label_name="label", label_probabilities=LABEL_PROBABILITIES)
    patches = timed("draw_patches", lambda: list(sampler(subject, SAMPLES_PER_VOLUME)))
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
                                    "augmentation": AUGMENTATION, "suffix": args.suffix, "unit": "s per volume"})
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
