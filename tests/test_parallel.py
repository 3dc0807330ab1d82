"""map_cases: results in input order for any worker count, and processes that survive a parent whose
OpenMP pool has already run (forked children hang there in their first parallel region)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from nnmamba.data.parallel import map_cases


def _square(value: int) -> int:
    return value * value


def test_results_keep_the_input_order_for_any_worker_count() -> None:
    items = list(range(7))
    assert map_cases(_square, items, 1, "t", progress=False) == map_cases(_square, items, 3, "t", progress=False) \
        == [v * v for v in items]


def test_cases_run_in_processes_after_the_parent_used_openmp() -> None:
    script = textwrap.dedent("""
        import torch
        from nnmamba.data.parallel import map_cases
        from tests.test_parallel import _resample

        torch.set_num_threads(2)
        _resample(0)                      # the parent's OpenMP pool runs
        print(map_cases(_resample, [1, 2], 2, "t", progress=False))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().startswith("[")


def _resample(seed: int) -> float:
    """A multi-threaded torch call (what preprocessing's resampling runs) in two threads."""
    import torch

    torch.set_num_threads(2)
    volume = torch.randn(1, 8, 48, 48, 48, generator=torch.Generator().manual_seed(seed))
    return float(torch.nn.functional.interpolate(volume, scale_factor=1.3, mode="trilinear").sum())
