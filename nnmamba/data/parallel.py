"""One case per process: the data stages' work is per case and independent (nnU-Net's `-np`).

Results come back in input order, so the output does not depend on the number of workers. Each
process gets an equal share of the machine's threads; left at torch's default, every process
would start one thread per core and they would fight over them. The processes are spawned, not
forked: a child forked from a parent whose OpenMP pool has run hangs in its first parallel
region (GNU OpenMP is not fork-safe), which is what the fingerprint's torch calls leave behind.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import TypeVar

import torch
from tqdm import tqdm

Item, Result = TypeVar("Item"), TypeVar("Result")


def _share_threads(threads: int) -> None:
    torch.set_num_threads(threads)


def map_cases(function: Callable[[Item], Result], items: Sequence[Item], workers: int, desc: str,
              progress: bool = True) -> list[Result]:
    """`function` over `items` in `workers` processes (in this process when workers <= 1), in order, with a
    progress bar. The first error raised by a case is raised here, once the cases under way have ended."""
    if workers <= 1 or len(items) <= 1:
        return [function(item) for item in tqdm(items, desc=desc, unit="case", disable=not progress)]
    workers = min(workers, len(items))
    threads = max(1, (os.cpu_count() or 1) // workers)
    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=spawn, initializer=_share_threads, initargs=(threads,)) as pool:
        return list(tqdm(pool.map(function, items), total=len(items), desc=desc, unit="case", disable=not progress))
