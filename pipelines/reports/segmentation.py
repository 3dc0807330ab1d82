"""Segmentation reports: the paper's Table 1 per study (Dice and HD95 per region or organ, then NSD),
a Dice bar chart and test-case overlays, and Table 2 per organ dataset (pipelines/reports/organs.py).
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from nnmamba.atomic import write_file  # noqa: E402
from pipelines import workspace  # noqa: E402
from pipelines.params import ReportSpec, StudySpec  # noqa: E402
from pipelines.reports.complexity import COUNTER, PAPER_PATCH, RowComplexity, row_complexity, shape_label  # noqa: E402
from pipelines.reports.figures import save_png  # noqa: E402
from pipelines.reports.organs import organ_groups, test_set_label  # noqa: E402
from pipelines.reports.overlays import overlay_figure  # noqa: E402
from pipelines.reports.tables import cell, markdown_table, row_label  # noqa: E402
from pipelines.resolve import resolve_study  # noqa: E402
from pipelines.tracking import attach_to_parent_run  # noqa: E402


def segmentation_tables(study: str, summary: dict, regions: list[str], complexity: dict[str, RowComplexity],
                        patch: tuple[int, ...]) -> str:
    """Table 1 shape (size, compute, Dice %, HD95 mm per region + average), then NSD % per region + average."""
    names = regions + ["mean"]
    shown = regions + ["Average"]
    header = (["Method", "Params (M)", f"GMACs {shape_label(patch)}"] + [f"Dice {r}" for r in shown]
              + [f"HD95 {r}" for r in shown])
    rows = [
        [row_label(v), *complexity[v].cells(patch)]
        + [cell(summary[v][f"test_dice_{r}"], 100) for r in names]
        + [cell(summary[v][f"test_hd95_{r}"]) for r in names]
        for v in summary
    ]
    nsd_rows = [[row_label(v)] + [cell(summary[v][f"test_nsd_{r}"], 100) for r in names] for v in summary]
    return (
        f"## {study}: Dice (%) and HD95 (mm), mean ± std over seeds\n\n{COUNTER}\n\n"
        + markdown_table(header, rows)
        + f"\n## {study}: NSD (%), mean ± std over seeds\n\n"
        + markdown_table(["Method"] + [f"NSD {r}" for r in shown], nsd_rows)
    )


def dice_chart(study: str, summary: dict, regions: list[str], path: Path) -> None:
    """Grouped bars: Dice per region and variant, error bars = std over seeds."""
    names = regions + ["mean"]
    width = 0.8 / len(summary)
    fig, ax = plt.subplots(figsize=(1.6 * len(names) + 2, 4))
    for i, variant in enumerate(summary):
        means = [summary[variant][f"test_dice_{r}"]["mean"] * 100 for r in names]
        stds = [summary[variant][f"test_dice_{r}"]["std"] * 100 for r in names]
        ax.bar(np.arange(len(names)) + i * width, means, width, yerr=stds, capsize=3,
               label=row_label(variant))
    ax.set_xticks(np.arange(len(names)) + width * (len(summary) - 1) / 2, regions + ["Average"])
    ax.set_ylabel("Dice (%)")
    ax.set_ylim(0, 100)
    ax.set_title(f"{study}: test Dice, mean ± std over seeds")
    ax.legend()
    fig.tight_layout()
    save_png(fig, path, dpi=120)


def segmentation_report(study: StudySpec, summary: dict, overlay_cases: int, out_dir: Path) -> list[Path]:
    """Table 1-shaped tables, the Dice chart and the overlays; the table first.

    A study without a labelled test case (AMOS imagesTs) gets a note instead of tables.
    """
    name, regions = study.name, list(study.evaluate.regions)
    table, chart = out_dir / f"{name}_table.md", out_dir / f"{name}_dice.png"
    files = [table]
    if summary:
        write_file(table, segmentation_tables(name, summary, regions, row_complexity(name), study.train.patch_size))
        dice_chart(name, summary, regions, chart)
        files.append(chart)
    else:
        write_file(table, f"## {name}\n\nNo labelled test case: the predictions in predictions/{name}/ are for "
                           "the dataset's own evaluation (AMOS: the challenge site).\n")
    overlays = overlay_figure(name, overlay_cases, out_dir / f"{name}_overlays.png")
    return files + ([overlays] if overlays else [])


def organ_table(group: str, studies: list[StudySpec]) -> str:
    """The paper's Table 2 for studies of one organ dataset: size, compute, mDice and mNSD per test set."""
    summaries = {s.name: workspace.load_summary(s.name) for s in studies}
    header = ["Method", "Params (M)", f"GMACs {shape_label(PAPER_PATCH)}"]
    for study in studies:
        label = test_set_label(study)
        header += [f"{label} GMACs {shape_label(study.train.patch_size)}", f"{label} mDice (%)", f"{label} mNSD (%)"]
    rows = []
    for variant, measured in row_complexity(studies[0].name).items():
        row = [row_label(variant), *measured.cells(PAPER_PATCH)]
        for study in studies:
            stats = summaries[study.name].get(variant)
            row += [measured.gmacs(study.train.patch_size),
                    cell(stats["test_dice_mean"], 100) if stats else "–",
                    cell(stats["test_nsd_mean"], 100) if stats else "–"]
        rows.append(row)
    return (f"## {group}: parameters, compute and mean Dice / NSD over organs per test set (paper Table 2)\n\n"
            f"{COUNTER} Metrics are mean ± std over seeds of the mean over test cases.\n\n"
            + markdown_table(header, rows))


def segmentation_reports(studies: list[StudySpec], settings: ReportSpec, out_dir: Path) -> list[Path]:
    """Every evaluated study's Table 1 files, then one Table 2 per organ dataset; attached to the MLflow
    parent runs. Returns the tables.

    `studies` are as params.yaml gives them: organ studies are those without `evaluate.regions`
    there, which resolving (one region per class) would hide."""
    tables = []
    for study in studies:
        summary = workspace.load_summary(study.name)
        if summary is None:
            continue
        files = segmentation_report(resolve_study(study), summary, settings.overlay_cases, out_dir)
        attach_to_parent_run(study, files)
        tables.append(files[0])
    for group, members in organ_groups(studies).items():
        table = out_dir / f"{group}_table2.md"
        write_file(table, organ_table(group, [resolve_study(study) for study in members]))
        for study in members:
            attach_to_parent_run(study, [table])
        tables.append(table)
    return tables
