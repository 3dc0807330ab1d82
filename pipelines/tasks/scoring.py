"""What the tasks' evaluators share: the device of a Ray evaluation task, the keys that name a trial's
rows, the mean per trial."""

from __future__ import annotations

import pandas as pd
import torch


def evaluation_device() -> torch.device:
    """Where a Ray evaluation task runs: the GPU Ray gave it, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def trial_keys(per_case: pd.DataFrame) -> list[str]:
    """The columns that name a trial in a per-case table: variant, seed, and fold in a k-fold study."""
    return ["variant", "seed", *(["fold"] if "fold" in per_case.columns else [])]


def trial_key(trial: dict, names) -> tuple:
    """A trials.json row's key into a table indexed by `trial_keys`."""
    return tuple(trial[name] for name in names)


def mean_per_seed(per_case: pd.DataFrame) -> pd.DataFrame:
    """Each trial's mean over test cases of every `test_*` column (empty without labelled cases)."""
    return per_case.groupby(trial_keys(per_case))[[c for c in per_case.columns if c.startswith("test_")]].mean()
