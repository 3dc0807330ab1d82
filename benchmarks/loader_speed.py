"""Training input pipeline throughput: BraTS-size volumes, 128^3 patches, the paper profile's augmentation.

Writes `--cases` synthetic preprocessed cases (4 x 240 x 240 x 155 float32 images, the uncropped
BraTS size, i.e. the worst case, and label maps with tumour-like blobs) as .nii.gz, unpacks them
(once per case, as training does on a case's first visit; timed apart), then times
`nnmamba.data.loading.sampling.make_patch_loader` (label-weighted patches, batch 2, page-locked batches
when there is a GPU, as GPU training loads them) with the given worker counts and compares
batches/s with the GPU's train steps/s (issue target: >= 1.5x).

    python benchmarks/loader_speed.py --out benchmarks/results/loader_speed.json --workers 16 --gpu-step-ms 39.8
"""

from __future__ import annotations

import argparse
import itertools
import math
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torchio as tio
from torch.utils.data import Dataset

from _common import ResultFile, paper_augmentation
from nnmamba.data.loading.sampling import PatchBatchLoader, case_id_of, collate_patches, make_patch_loader, patch_batch_loader
from nnmamba.data.loading.unpacked import unpack_case
from nnmamba.data.loading.worker_buffers import GROUPS_AHEAD

SHAPE = (240, 240, 155)
BATCH, SAMPLES_PER_VOLUME, QUEUE_LENGTH = 2, 8, 64
PATCH = (128, 128, 128)
LABEL_PROBABILITIES = {0: 1, 1: 1, 2: 1, 3: 1}  # every label (background too) equally often
AUGMENTATION = paper_augmentation()


def write_case(directory: Path, index: int, suffix: str = ".nii.gz") -> tuple[Path, Path]:
    """One case: smooth random 4-channel image, labels 1-3 in nested blobs (like whole tumour / core / enhancing)."""
    rng = np.random.default_rng(index)
    coarse = torch.from_numpy(rng.standard_normal((1, 4, 15, 15, 10)).astype(np.float32))
    image = torch.nn.functional.interpolate(coarse, size=SHAPE, mode="trilinear")[0]
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in SHAPE], indexing="ij"))
    centre = np.array([rng.integers(60, s - 60) for s in SHAPE]).reshape(3, 1, 1, 1)
    distance = np.sqrt(((grid - centre) ** 2).sum(0))
    label = np.select([distance < 8, distance < 14, distance < 25], [3, 1, 2], 0).astype(np.uint8)
    paths = directory / f"case{index:03d}_image{suffix}", directory / f"case{index:03d}_label{suffix}"
    tio.ScalarImage(tensor=image).save(paths[0])
    tio.LabelMap(tensor=torch.from_numpy(label)[None]).save(paths[1])
    return paths


def unpack(paths: tuple[Path, Path], unpacked_dir: Path) -> None:
    unpack_case(case_id_of(paths[0]), *paths, unpacked_dir)


class ReadyPatches(Dataset):
    """Items of ready-made patches: the loader's rate with them is what the main process can take in."""

    samples_per_volume = SAMPLES_PER_VOLUME

    def __init__(self, subjects: int):
        self.subjects = subjects
        self.image = torch.randn(4, *PATCH)
        self.label = torch.zeros(1, *PATCH, dtype=torch.uint8)

    def __len__(self) -> int:
        return self.subjects

    def __getitem__(self, index: int) -> list[tio.Subject]:
        return [tio.Subject(image=tio.ScalarImage(tensor=self.image), label=tio.LabelMap(tensor=self.label),
                            case_id=str(index), **{tio.LOCATION: torch.zeros(6, dtype=torch.int64)})
                for _ in range(SAMPLES_PER_VOLUME)]


def steady_rate(loader: PatchBatchLoader, batches: int) -> dict:
    """Steady-state batches/s, over whole windows, after the batches made ahead have been drained.

    Workers make up to GROUPS_AHEAD groups each before the main process asks (they are made while
    the first batch is awaited), and the loader hands out batches a window at a time (the
    batches of the groups it mixes, about QUEUE_LENGTH patches). So the warm-up drains what can
    be made ahead plus two windows, the timed count is at least four times what can be made
    ahead, and it is rounded up to whole windows: a partial window would be timed in full but
    counted in part. Timing from the first batch would count ready-made batches as throughput.
    """
    stream = itertools.chain.from_iterable(itertools.repeat(loader))
    started = time.perf_counter()
    next(stream)
    first = time.perf_counter() - started
    window = max(1, QUEUE_LENGTH // (BATCH * SAMPLES_PER_VOLUME)) * SAMPLES_PER_VOLUME
    ahead = loader.num_workers * GROUPS_AHEAD * SAMPLES_PER_VOLUME
    warmup, batches = ahead + 2 * window, math.ceil(max(batches, 4 * ahead) / window) * window
    for _ in range(warmup):
        next(stream)
    started = time.perf_counter()
    for _ in range(batches):
        next(stream)
    elapsed = time.perf_counter() - started
    return {"first_batch_s": first, "warmup_batches": warmup, "batches": batches, "seconds": elapsed,
            "batches_per_s": batches / elapsed}


def loader_rate(images: list[Path], labels: list[Path], unpacked_dir: Path, workers: int, batches: int,
                pin_memory: bool, image_dtype: torch.dtype, transport_only: bool) -> dict:
    """The training loader's steady rate; ``transport_only``: its batching and hand-over of ready patches."""
    collate = partial(collate_patches, image_dtype=image_dtype)
    if transport_only:
        loader = patch_batch_loader(ReadyPatches(len(images)), len(images), collate, BATCH, QUEUE_LENGTH, workers,
                                    seed=0, rank=0, world_size=1, pin_memory=pin_memory)
    else:
        loader = make_patch_loader(images, labels, patch_size=PATCH, batch_size=BATCH,
                                   samples_per_volume=SAMPLES_PER_VOLUME, queue_length=QUEUE_LENGTH,
                                   label_probabilities=LABEL_PROBABILITIES, augmentation=AUGMENTATION,
                                   num_workers=workers, seed=0, pin_memory=pin_memory, unpacked_dir=unpacked_dir,
                                   image_dtype=image_dtype)
    return {"workers": workers, "transport_only": transport_only, "pin_memory": pin_memory,
            "image_dtype": str(image_dtype).removeprefix("torch."), **steady_rate(loader, batches)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--cases", type=int, default=32, help="distinct cases written")
    parser.add_argument("--subjects", type=int, default=512, help="training subjects per pass (the cases, cycled)")
    parser.add_argument("--workers", nargs="+", type=int, default=[16])
    parser.add_argument("--batches", type=int, default=200, help="timed batches after the warm-up")
    parser.add_argument("--suffix", default=".nii.gz", help="file format of the cases (.nii: uncompressed)")
    parser.add_argument("--gpu-step-ms", type=float, required=True, help="measured train step of the GPU to feed")
    parser.add_argument("--no-pin-memory", action="store_true", help="pageable batches even with a GPU")
    parser.add_argument("--image-dtype", default="bfloat16", choices=["bfloat16", "float32"],
                        help="batch image type: the paper profile trains with bf16 autocast, so bfloat16")
    parser.add_argument("--transport-only", action="store_true",
                        help="also time ready-made patches: what the main process can take in")
    args = parser.parse_args()
    pin_memory = torch.cuda.is_available() and not args.no_pin_memory
    directory = Path(tempfile.mkdtemp(prefix="loader_speed_"))
    started = time.perf_counter()
    with ProcessPoolExecutor() as pool:
        pairs = list(pool.map(write_case, itertools.repeat(directory), range(args.cases), itertools.repeat(args.suffix)))
    results = ResultFile(args.out, {"benchmark": "loader_speed", "volume": [4, *SHAPE], "patch": list(PATCH),
                                    "batch": BATCH, "samples_per_volume": SAMPLES_PER_VOLUME, "queue_length": QUEUE_LENGTH,
                                    "augmentation": asdict(AUGMENTATION), "cases": args.cases, "subjects": args.subjects, "suffix": args.suffix,
                                    "gpu_step_ms": args.gpu_step_ms, "write_cases_s": time.perf_counter() - started})
    unpacked_dir = directory / "unpacked"
    started = time.perf_counter()
    with ProcessPoolExecutor() as pool:
        list(pool.map(unpack, pairs, itertools.repeat(unpacked_dir)))
    results.payload["unpack_cases_s"] = time.perf_counter() - started
    # A pass over a real training set (BraTS: ~1000 cases) holds hundreds of groups; with a few dozen the
    # workers would mostly wait at pass ends for the slowest one. The written cases are reused instead.
    pairs = list(itertools.islice(itertools.cycle(pairs), args.subjects))
    images, labels = [p[0] for p in pairs], [p[1] for p in pairs]
    for workers in args.workers:
        for transport_only in (False, True) if args.transport_only else (False,):
            entry = loader_rate(images, labels, unpacked_dir, workers, args.batches, pin_memory,
                                getattr(torch, args.image_dtype), transport_only)
            entry["ratio_to_gpu_step_rate"] = entry["batches_per_s"] * args.gpu_step_ms / 1e3
            results.add(entry)
            print(f"loader {workers:2d} workers{' (transport only)' if transport_only else ''}: "
                  f"{entry['batches_per_s']:.1f} batches/s = {entry['ratio_to_gpu_step_rate']:.2f}x "
                  f"the GPU's {1e3 / args.gpu_step_ms:.1f} steps/s", flush=True)


if __name__ == "__main__":
    main()
