"""What the tasks' evaluators share: the device of a Ray evaluation task and the per-seed mean."""

from __future__ import annotations

import pandas as pd
import torch


def evaluation_device() -> torch.device:
    """Where a Ray evaluation task runs: the GPU Ray gave it, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def mean_per_seed(per_case: pd.DataFrame) -> pd.DataFrame:
    """Each (variant, seed)'s mean over test cases of every `test_*` column (empty without labelled cases)."""
    return per_case.groupby(["variant", "seed"])[[c for c in per_case.columns if c.startswith("test_")]].mean()
