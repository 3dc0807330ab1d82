"""The report's number cells: the paper's `mean ± std`, a single trial shown as what it is, and the
HD95 cells that hold the empty-mask convention footnoted."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from nnmamba.metrics import BRATS_REGIONS, segmentation_metrics
from pipelines.evaluate import summarise
from pipelines.reports.complexity import RowComplexity
from pipelines.reports.paper import load_paper_numbers
from pipelines.reports.segmentation import FALLBACK_MARK, FALLBACK_NOTE, segmentation_tables
from pipelines.reports.tables import cell


def test_summary_counts_the_trials_behind_each_mean():
    per_seed = pd.DataFrame({"variant": ["a", "a", "b"], "seed": [0, 1, 0], "test_dice_WT": [0.5, 0.7, 0.9]}
                            ).set_index(["variant", "seed"])
    summary = summarise(per_seed)
    assert summary["a"]["test_dice_WT"]["n"] == 2 and summary["b"]["test_dice_WT"]["n"] == 1


def test_a_cell_of_several_trials_is_mean_and_std_and_of_one_trial_says_n_1():
    assert cell({"mean": 0.6, "std": 0.1, "n": 2}, 100) == "60.00 ± 10.00"
    assert cell({"mean": 0.9, "std": 0.0, "n": 1}, 100) == "90.00 (n = 1)"
    assert cell({"mean": 0.9, "std": 0.0}) == "0.90 ± 0.00"   # a summary written before n was recorded


def test_table_1_footnotes_hd95_cells_scored_by_the_empty_mask_convention():
    """A real per-case scoring (nnmamba.metrics) of two cases, one of which misses ET, through the
    evaluate stage's summary into Table 1: only ET's and the average's HD95 cells get the mark."""
    gt = np.zeros((8, 8, 8), dtype=np.int64)
    gt[2:6, 2:6, 2:6], gt[3:5, 3:5, 3:5] = 2, 3
    missed_et = np.where(gt == 3, 1, gt)
    rows = [{"variant": "mic", "seed": seed, **{f"test_{k}": v for k, v in
             segmentation_metrics(pred, gt, (1.0, 1.0, 1.0), BRATS_REGIONS, 1.0).items()}}
            for seed, pred in enumerate([gt, missed_et])]
    summary = summarise(pd.DataFrame(rows).set_index(["variant", "seed"]))
    assert summary["mic"]["test_hd95_fallback_ET"]["mean"] == 0.5
    table = segmentation_tables("brats", summary, ["WT", "TC", "ET"],
                                {"mic": RowComplexity(1_000_000, lambda shape: 2 * 10**9)}, (8, 8, 8))
    header, _, row = table.splitlines()[4:7]
    cells = dict(zip(*([c.strip() for c in line.strip("|").split("|")] for line in (header, row))))
    assert [name for name, value in cells.items() if value.endswith(FALLBACK_MARK)] == ["HD95 ET", "HD95 Average"]
    assert f"{FALLBACK_MARK} {FALLBACK_NOTE}" in table
    assert FALLBACK_MARK not in segmentation_tables("brats", summarise(pd.DataFrame(rows[:1]).set_index(
        ["variant", "seed"])), ["WT", "TC", "ET"], {"mic": RowComplexity(1, lambda shape: 1)}, (8, 8, 8))


def test_table_1_of_brats2023_gets_the_papers_rows_marked_and_other_studies_none():
    paper = load_paper_numbers(str(Path(__file__).resolve().parents[1] / "pipelines/reports/paper_numbers.yaml"))
    summary = {"mic": {f"test_{m}_{r}": {"mean": 0.5, "std": 0.1, "n": 2} for m in ("dice", "hd95", "nsd")
                       for r in ("WT", "TC", "ET", "mean")}}
    complexity = {"mic": RowComplexity(1_000_000, lambda shape: 10**9)}
    table = segmentation_tables("brats2023", summary, ["WT", "TC", "ET"], complexity, (8, 8, 8), paper)
    rows = {line.strip("|").split("|")[0].strip(): [c.strip() for c in line.strip("|").split("|")[1:]]
            for line in table.splitlines() if line.startswith("| ")}
    assert rows["nnMamba (paper)"] == ["–", "–", "93.46", "90.74", "85.72", "89.97", "4.18", "5.12", "10.31", "6.53"]
    assert {"UniMiss (paper)", "DIT (paper)", "UNETR (paper)", "nnU-Net (paper)"} <= set(rows)
    assert "published numbers of Gong et al." in table
    assert "(paper)" not in segmentation_tables("amos_ct", summary, ["WT", "TC", "ET"], complexity, (8, 8, 8), paper)
