"""The paper's Table 5: one ablation table over the three tasks, from each task's evaluated study.

Table 5 puts the ablation rungs of every task on shared rows: the dense tasks (segmentation,
landmark detection) climb Baseline -> +MIC -> +MICCSS, classification Baseline -> +MICCSS ->
+Sequence, so row k holds the k-th registered variant of each task (`nnmamba.models` registers
them in that order). `report.ablation` in params.yaml names the study that fills each task's
columns (the paper: BraTS 2023, the fetal landmarks, ADNI NC vs AD); a task whose study is not
evaluated yet shows dashes. Segmentation columns are the means over regions (or classes) of Dice
and HD95, landmark the MRE over all landmarks, classification the AUC, each mean ± std over seeds.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from nnmamba.atomic import write_file  # noqa: E402
from nnmamba.models import available_variants  # noqa: E402
from pipelines.reports.figures import figure_path, save_png  # noqa: E402
from pipelines.reports.paper import PAPER_SUFFIX, paper_note  # noqa: E402
from pipelines.reports.tables import VARIANT_LABELS, cell, markdown_table  # noqa: E402
from pipelines.workspace import load_summary  # noqa: E402

# (task, summary metric, column title, scale to the paper's unit); Dice and AUC in %, HD95 and MRE in mm.
COLUMNS = (
    ("segmentation", "test_dice_mean", "Dice (%)", 100.0),
    ("segmentation", "test_hd95_mean", "HD95 (mm)", 1.0),
    ("landmark", "test_mre_mm_mean", "MRE (mm)", 1.0),
    ("classification", "test_auc", "AUC (%)", 100.0),
)
TASKS = ("segmentation", "landmark", "classification")


def load_summaries(studies: dict[str, str]) -> dict[str, dict]:
    """Each task's test summary ({variant: {metric: {mean, std}}}); {} where the study has none yet."""
    return {task: (load_summary(studies[task]) if studies.get(task) else None) or {} for task in TASKS}


def rungs() -> list[dict[str, str]]:
    """Row k: the k-th registered variant of every task (Baseline, +MIC / +MICCSS, +MICCSS / +Sequence)."""
    variants = {task: available_variants(task) for task in TASKS}
    return [{task: variants[task][k] for task in TASKS} for k in range(min(map(len, variants.values())))]


def ablation_table(studies: dict[str, str], summaries: dict[str, dict], paper: dict | None = None) -> str:
    """Markdown in the shape of Table 5: a method column per variant family, the metrics of each task's study;
    `paper` (the paper-numbers file's content) adds the published Table 5 below, its rows marked."""
    header = ["Method", *(f"{studies[t]} {title}" for t, _, title, _ in COLUMNS[:3]),
              "Method (cls.)", f"{studies['classification']} {COLUMNS[3][2]}"]
    rows, published = [], (paper or {}).get("table5", {})
    for rung in rungs():
        values = [_value(summaries[task], rung[task], metric, scale) for task, metric, _, scale in COLUMNS]
        rows.append([VARIANT_LABELS[rung["segmentation"]], *values[:3], VARIANT_LABELS[rung["classification"]],
                     values[3]])
    if published:
        for rung in rungs():
            values = [_published(published, task, rung[task], metric) for task, metric, _, _ in COLUMNS]
            rows.append([VARIANT_LABELS[rung["segmentation"]] + PAPER_SUFFIX, *values[:3],
                         VARIANT_LABELS[rung["classification"]] + PAPER_SUFFIX, values[3]])
    return ("## Ablation over the three tasks (paper Table 5), mean ± std over seeds\n\n" + markdown_table(header, rows)
            + "\nRows pair the k-th variant of each task: the dense tasks add MIC then CSS, "
              "classification adds MICCSS then the channel-sequential head.\n"
            + (paper_note(paper) if published else ""))


def _published(published: dict, task: str, variant: str, metric: str) -> str:
    value = published.get(task, {}).get(variant, {}).get(metric)
    return "–" if value is None else f"{value:.2f}"


def _value(summary: dict, variant: str, metric: str, scale: float) -> str:
    stats = summary.get(variant, {}).get(metric)
    return cell(stats, scale) if stats else "–"


def ablation_chart(studies: dict[str, str], summaries: dict[str, dict], path: Path) -> None:
    """One panel per Table 5 column: each rung's mean with its std over seeds as an error bar."""
    fig, axes = plt.subplots(1, len(COLUMNS), figsize=(3.2 * len(COLUMNS), 3.2))
    for ax, (task, metric, title, scale) in zip(axes, COLUMNS):
        labels, means, stds = [], [], []
        for rung in rungs():
            stats = summaries[task].get(rung[task], {}).get(metric)
            labels.append(VARIANT_LABELS[rung[task]])
            means.append(stats["mean"] * scale if stats else 0.0)
            stds.append(stats["std"] * scale if stats else 0.0)
        ax.bar(labels, means, yerr=stds, capsize=4, color=["#9e9e9e", "#64b5f6", "#1565c0"][: len(labels)])
        ax.set_title(f"{studies.get(task) or task}\n{title}", fontsize=9)
        ax.tick_params(axis="x", labelsize=8, rotation=20)
    fig.suptitle("nnMamba ablation (Table 5 shape)", fontsize=10)
    fig.tight_layout()
    save_png(fig, path, dpi=120)


def ablation_report(studies: dict[str, str], out_dir: Path, paper: dict | None = None) -> list[Path]:
    """`ablation_table5.md` and `ablation_table5.png`; nothing while no named study has test results."""
    summaries = load_summaries(studies)
    if not any(summaries.values()):
        return []
    out_dir.mkdir(parents=True, exist_ok=True)
    table, chart = out_dir / "ablation_table5.md", figure_path(out_dir, "ablation_table5.png")
    write_file(table, ablation_table(studies, summaries, paper))
    ablation_chart(studies, summaries, chart)
    return [table, chart]
