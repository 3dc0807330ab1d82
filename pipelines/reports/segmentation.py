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
from pipelines.reports.figures import figure_path, save_png  # noqa: E402
from pipelines.reports.organs import organ_groups, test_set_label  # noqa: E402
from pipelines.reports.overlays import overlay_figure  # noqa: E402
from pipelines.reports.paper import PAPER_SUFFIX, load_paper_numbers, paper_note  # noqa: E402
from pipelines.reports.tables import cell, markdown_table, row_label  # noqa: E402
from pipelines.resolve import resolve_study  # noqa: E402
from pipelines.tracking import attach_to_parent_run  # noqa: E402


MAX_CHART_WIDTH_IN = 12
FALLBACK_MARK = "†"
FALLBACK_NOTE = ("includes test cases where the region is in only one of the prediction and the ground truth: "
                 "their HD95 is the diagonal of the volume (nnmamba.metrics), not a measured distance.")


def fallback_mark(stats: dict, regions: list[str]) -> str:
    """`FALLBACK_MARK` when any case of any of `regions` had its HD95 from the empty-mask convention
    (summaries written before the flag was recorded have none, and get no mark)."""
    flagged = (stats.get(f"test_hd95_fallback_{r}", {}).get("mean", 0.0) > 0 for r in regions)
    return f" {FALLBACK_MARK}" if any(flagged) else ""


def segmentation_tables(study: str, summary: dict, regions: list[str], complexity: dict[str, RowComplexity],
                        patch: tuple[int, ...], paper: dict | None = None) -> str:
    """Table 1 shape (size, compute, Dice %, HD95 mm per region + average), then NSD % per region + average.

    `paper` (the paper-numbers file's content) adds the published Table 1 rows of this study, marked."""
    names = regions + ["mean"]
    shown = regions + ["Average"]
    header = (["Method", "Params (M)", f"GMACs {shape_label(patch)}"] + [f"Dice {r}" for r in shown]
              + [f"HD95 {r}" for r in shown])
    rows = [
        [row_label(v), *complexity[v].cells(patch)]
        + [cell(summary[v][f"test_dice_{r}"], 100) for r in names]
        + [cell(summary[v][f"test_hd95_{r}"]) + fallback_mark(summary[v], regions if r == "mean" else [r])
           for r in names]
        for v in summary
    ]
    published = paper_rows(study, names, paper or {})
    nsd_rows = [[row_label(v)] + [cell(summary[v][f"test_nsd_{r}"], 100) for r in names] for v in summary]
    marked = any(fallback_mark(summary[v], regions) for v in summary)
    return (
        f"## {study}: Dice (%) and HD95 (mm), mean ± std over seeds\n\n{COUNTER}\n\n"
        + markdown_table(header, rows + published)
        + (f"\n{FALLBACK_MARK} {FALLBACK_NOTE}\n" if marked else "")
        + (paper_note(paper) if published else "")
        + f"\n## {study}: NSD (%), mean ± std over seeds\n\n"
        + markdown_table(["Method"] + [f"NSD {r}" for r in shown], nsd_rows)
    )


def paper_rows(study: str, names: list[str], paper: dict) -> list[list[str]]:
    """The paper's Table 1 rows of `study` (Dice and HD95 per region; it prints no size or compute),
    when it has them for exactly these regions."""
    rows = []
    for method, numbers in paper.get("table1", {}).get(study, {}).items():
        if set(numbers["dice"]) == set(names) == set(numbers["hd95"]):
            rows.append([method + PAPER_SUFFIX, "–", "–"] + [f"{numbers['dice'][r]:.2f}" for r in names]
                        + [f"{numbers['hd95'][r]:.2f}" for r in names])
    return rows


def dice_chart(study: str, summary: dict, regions: list[str], path: Path) -> None:
    """Grouped bars: Dice per region and variant, error bars = std over seeds."""
    names = regions + ["mean"]
    width = 0.8 / len(summary)
    # At most a page wide: 15 AMOS organs at a fixed inch per region came out 3312 px wide.
    fig, ax = plt.subplots(figsize=(min(MAX_CHART_WIDTH_IN, 2.5 + 0.75 * len(names)), 4.5))
    tops = []
    for i, variant in enumerate(summary):
        means = [summary[variant][f"test_dice_{r}"]["mean"] * 100 for r in names]
        stds = [summary[variant][f"test_dice_{r}"]["std"] * 100 for r in names]
        trials = summary[variant]["test_dice_mean"].get("n")
        ax.bar(np.arange(len(names)) + i * width, means, width, yerr=stds, capsize=2,
               label=row_label(variant) + (f" (n = {trials})" if trials else ""))
        tops += [m + s for m, s in zip(means, stds)]
    many = len(names) > 6
    ax.set_xticks(np.arange(len(names)) + width * (len(summary) - 1) / 2, regions + ["Average"],
                  rotation=45 if many else 0, ha="right" if many else "center")
    ax.set_ylabel("Dice (%)")
    # The axis fits the bars (with room for the legend) so that low Dice stays readable; it still starts at 0.
    ax.set_ylim(0, min(100, max(max(tops, default=0) * 1.3, 5)))
    ax.set_title(f"{study}: test Dice, mean ± std over seeds")
    ax.legend()
    fig.tight_layout()
    save_png(fig, path, dpi=120)


def segmentation_report(study: StudySpec, summary: dict, overlay_cases: int, out_dir: Path,
                        paper: dict | None = None) -> list[Path]:
    """Table 1-shaped tables, the Dice chart and the overlays; the table first.

    A study without a labelled test case (AMOS imagesTs) gets a note instead of tables.
    """
    name, regions = study.name, list(study.evaluate.regions)
    table, chart = out_dir / f"{name}_table.md", figure_path(out_dir, f"{name}_dice.png")
    files = [table]
    if summary:
        write_file(table, segmentation_tables(name, summary, regions, row_complexity(name), study.train.patch_size,
                                              paper))
        dice_chart(name, summary, regions, chart)
        files.append(chart)
    else:
        write_file(table, f"## {name}\n\nNo labelled test case: the predictions in predictions/{name}/ are for "
                           "the dataset's own evaluation (AMOS: the challenge site).\n")
    overlays = overlay_figure(name, overlay_cases, figure_path(out_dir, f"{name}_overlays.png"))
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
    paper = load_paper_numbers(settings.paper_numbers)
    for study in studies:
        summary = workspace.load_summary(study.name)
        if summary is None:
            continue
        files = segmentation_report(resolve_study(study), summary, settings.overlay_cases, out_dir, paper)
        attach_to_parent_run(study, files)
        tables.append(files[0])
    for group, members in organ_groups(studies).items():
        table = out_dir / f"{group}_table2.md"
        write_file(table, organ_table(group, [resolve_study(study) for study in members]))
        for study in members:
            attach_to_parent_run(study, [table])
        tables.append(table)
    return tables
