"""Classification reports: the paper's Table 3 per dataset (ACC, F1, AUC of its studies side by side,
e.g. NC vs AD and sMCI vs pMCI) and a ROC curve per study."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
from sklearn.metrics import roc_auc_score, roc_curve  # noqa: E402

from nnmamba.atomic import write_file  # noqa: E402
from pipelines import workspace  # noqa: E402
from pipelines.params import StudySpec  # noqa: E402
from pipelines.reports.complexity import COUNTER, RowComplexity, row_complexity, shape_label  # noqa: E402
from pipelines.reports.figures import figure_path, save_png  # noqa: E402
from pipelines.reports.tables import cell, markdown_table, row_label  # noqa: E402
from pipelines.tasks.classification import probability_columns  # noqa: E402
from pipelines.tasks.scoring import trial_keys  # noqa: E402
from pipelines.tracking import attach_to_parent_run  # noqa: E402


CLASSIFICATION_METRICS = {"test_acc": "ACC", "test_f1": "F1", "test_auc": "AUC"}


def classification_table(dataset: str, results: dict[str, dict], complexity: dict[str, RowComplexity],
                         shape: tuple[int, ...]) -> str:
    """Table 3 shape: one row per variant or backbone, its size and compute, then ACC/F1/AUC (%) of each
    study (`results[title] = summary`) side by side."""
    variants = list(dict.fromkeys(v for summary in results.values() for v in summary))
    header = (["Method", "Params (M)", f"GMACs {shape_label(shape)}"]
              + [f"{title} {name}" for title in results for name in CLASSIFICATION_METRICS.values()])
    rows = [
        [row_label(v), *(complexity[v].cells(shape) if v in complexity else ["–", "–"])]
        + [cell(summary[v][metric], 100) if v in summary else "–" for summary in results.values()
           for metric in CLASSIFICATION_METRICS]
        for v in variants
    ]
    return (f"## {dataset}: classification, ACC / F1 / AUC (%), mean ± std over seeds\n\n{COUNTER}\n\n"
            + markdown_table(header, rows))


SEED_STYLES = ("-", "--", "-.", (0, (1, 1)))   # line style per seed (fold), cycling


def roc_chart(title: str, per_case: pd.DataFrame, path: Path) -> None:
    """ROC curves of every (variant, seed) on the test split, coloured by variant, styled by seed, each
    named with its own AUC; positive class = the last class."""
    columns = probability_columns(per_case)
    positive, positive_index = columns[-1], len(columns) - 1
    fig, ax = plt.subplots(figsize=(6, 6))
    for colour, (variant, frame) in zip(plt.cm.tab10.colors, per_case.groupby("variant")):
        names = trial_keys(frame)[1:]
        for number, (key, seed_frame) in enumerate(frame.groupby(names)):
            truth = seed_frame["target"] == positive_index
            fpr, tpr, _ = roc_curve(truth, seed_frame[positive])
            trial = ", ".join(f"{name} {value}" for name, value in zip(names, key))
            auc = f" (AUC {roc_auc_score(truth, seed_frame[positive]) * 100:.1f})" if truth.nunique() == 2 else ""
            ax.plot(fpr, tpr, color=colour, linestyle=SEED_STYLES[number % len(SEED_STYLES)], alpha=0.85,
                    label=f"{row_label(variant)}, {trial}{auc}")
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", label="chance")
    ax.set_xlabel("false positive rate")
    ax.set_ylabel(f"true positive rate ({positive.removeprefix('p_')})")
    ax.set_title(f"{title}: test ROC, one curve per seed")
    ax.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    save_png(fig, path, dpi=120)


def classification_study(study: StudySpec, out_dir: Path) -> dict | None:
    """Write a classification study's ROC chart; return what its dataset's table needs (None if not evaluated)."""
    summary = workspace.load_summary(study.name)
    if summary is None:
        return None
    title = " vs ".join(study.dataset.classes)
    roc = figure_path(out_dir, f"{study.name}_roc.png")
    roc_chart(title, pd.read_csv(workspace.path(workspace.TEST_PER_CASE, study=study.name)), roc)
    return {"study": study, "dataset": study.dataset.name, "title": title, "summary": summary, "roc": roc}


def classification_reports(studies: list[StudySpec], out_dir: Path) -> list[Path]:
    """One Table 3-shaped table per dataset over its evaluated classification studies, a ROC PNG per study."""
    evaluated = [result for study in studies if (result := classification_study(study, out_dir))]
    tables = []
    for dataset in dict.fromkeys(result["dataset"] for result in evaluated):
        results = [result for result in evaluated if result["dataset"] == dataset]
        table = out_dir / f"{dataset}_classification_table.md"
        first = results[0]["study"]
        write_file(table, classification_table(dataset, {r["title"]: r["summary"] for r in results},
                                                row_complexity(first.name), first.prepare.shape))
        for result in results:
            attach_to_parent_run(result["study"], [table, result["roc"]])
        tables.append(table)
    return tables
