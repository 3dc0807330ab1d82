"""DVC stage `report`: paper-style tables and plots for every evaluated study.

For a segmentation study: a markdown table in the shape of the paper's Table 1 (Dice and HD95
per region, mean ± std over seeds, one row per ablation variant), the same for NSD, and a PNG bar
chart with error bars. For the classification studies of a dataset: one table in the shape of the
paper's Table 3 (ACC, F1, AUC of each study side by side, e.g. NC vs AD and sMCI vs pMCI) and a
ROC curve PNG per study. Tables are also attached to the studies' MLflow parent runs.

    python -m pipelines.report
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from sklearn.metrics import roc_curve  # noqa: E402

from pipelines.config import load_params, resolve_path, study_config  # noqa: E402
from pipelines.evaluate import probability_columns  # noqa: E402
from pipelines.tracking import StudyRuns  # noqa: E402
from pipelines.train import METRICS_ROOT, MODELS_ROOT  # noqa: E402

REPORTS_ROOT = "reports"
VARIANT_LABELS = {"baseline": "Baseline", "mic": "+MIC", "miccss": "+MICCSS", "sequence": "+Sequence"}


def cell(stats: dict, scale: float = 1.0) -> str:
    """`mean ± std`, two decimals, as the paper prints them."""
    return f"{stats['mean'] * scale:.2f} ± {stats['std'] * scale:.2f}"


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def segmentation_tables(study: str, summary: dict, regions: list[str]) -> str:
    """Table 1 shape (Dice %, HD95 mm per region + average), then NSD % per region + average."""
    names = regions + ["mean"]
    shown = regions + ["Average"]
    header = ["Method"] + [f"Dice {r}" for r in shown] + [f"HD95 {r}" for r in shown]
    rows = [
        [VARIANT_LABELS.get(v, v)]
        + [cell(summary[v][f"test_dice_{r}"], 100) for r in names]
        + [cell(summary[v][f"test_hd95_{r}"]) for r in names]
        for v in summary
    ]
    nsd_rows = [[VARIANT_LABELS.get(v, v)] + [cell(summary[v][f"test_nsd_{r}"], 100) for r in names] for v in summary]
    return (
        f"## {study}: Dice (%) and HD95 (mm), mean ± std over seeds\n\n"
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
               label=VARIANT_LABELS.get(variant, variant))
    ax.set_xticks(np.arange(len(names)) + width * (len(summary) - 1) / 2, regions + ["Average"])
    ax.set_ylabel("Dice (%)")
    ax.set_ylim(0, 100)
    ax.set_title(f"{study}: test Dice, mean ± std over seeds")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report_study(study: str, out_dir: Path) -> Path | None:
    """Write one study's tables and chart; None when the study has not been evaluated."""
    summary_file = resolve_path(METRICS_ROOT) / study / "test_summary.json"
    if not summary_file.is_file():
        return None
    config = study_config(study)
    summary = json.loads(summary_file.read_text())
    regions = list(config["evaluate"]["regions"])
    table = out_dir / f"{study}_table.md"
    table.write_text(segmentation_tables(study, summary, regions))
    dice_chart(study, summary, regions, out_dir / f"{study}_dice.png")
    trials = json.loads((resolve_path(MODELS_ROOT) / study / "trials.json").read_text())
    runs = StudyRuns(config, trials["config_hash"])
    runs.client.log_artifact(trials["parent_run_id"], str(table), artifact_path="report")
    runs.client.log_artifact(trials["parent_run_id"], str(out_dir / f"{study}_dice.png"), artifact_path="report")
    return table


CLASSIFICATION_METRICS = {"test_acc": "ACC", "test_f1": "F1", "test_auc": "AUC"}


def classification_table(dataset: str, results: dict[str, dict]) -> str:
    """Table 3 shape: one row per variant, ACC/F1/AUC (%) of each study (`results[title] = summary`) side by side."""
    variants = list(dict.fromkeys(v for summary in results.values() for v in summary))
    header = ["Method"] + [f"{title} {name}" for title in results for name in CLASSIFICATION_METRICS.values()]
    rows = [
        [VARIANT_LABELS.get(v, v)]
        + [cell(summary[v][metric], 100) if v in summary else "–" for summary in results.values()
           for metric in CLASSIFICATION_METRICS]
        for v in variants
    ]
    return (f"## {dataset}: classification, ACC / F1 / AUC (%), mean ± std over seeds\n\n"
            + markdown_table(header, rows))


def roc_chart(title: str, per_case: pd.DataFrame, summary: dict, path: Path) -> None:
    """ROC curves of every (variant, seed) on the test split; positive class = the last class."""
    columns = probability_columns(per_case)
    positive, positive_index = columns[-1], len(columns) - 1
    fig, ax = plt.subplots(figsize=(5, 5))
    for colour, (variant, frame) in zip(plt.cm.tab10.colors, per_case.groupby("variant")):
        auc = summary[variant]["test_auc"]
        for number, (_, seed_frame) in enumerate(frame.groupby("seed")):
            fpr, tpr, _ = roc_curve(seed_frame["target"] == positive_index, seed_frame[positive])
            label = f"{VARIANT_LABELS.get(variant, variant)} (AUC {cell(auc, 100)})" if number == 0 else None
            ax.plot(fpr, tpr, color=colour, alpha=0.8, label=label)
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":")
    ax.set_xlabel("false positive rate")
    ax.set_ylabel(f"true positive rate ({positive.removeprefix('p_')})")
    ax.set_title(f"{title}: test ROC, one curve per seed")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def classification_study(study: str, out_dir: Path) -> dict | None:
    """Write a classification study's ROC chart; return what its dataset's table needs (None if not evaluated)."""
    metrics_dir = resolve_path(METRICS_ROOT) / study
    if not (metrics_dir / "test_summary.json").is_file():
        return None
    config = study_config(study)
    summary = json.loads((metrics_dir / "test_summary.json").read_text())
    title = " vs ".join(config["dataset"]["classes"])
    roc = out_dir / f"{study}_roc.png"
    roc_chart(title, pd.read_csv(metrics_dir / "test_per_case.csv"), summary, roc)
    trials = json.loads((resolve_path(MODELS_ROOT) / study / "trials.json").read_text())
    return {"dataset": config["dataset"]["name"], "title": title, "summary": summary, "roc": roc,
            "runs": StudyRuns(config, trials["config_hash"]), "parent_id": trials["parent_run_id"]}


def classification_reports(studies: list[str], out_dir: Path) -> list[Path]:
    """One Table 3-shaped table per dataset over its evaluated classification studies, a ROC PNG per study."""
    evaluated = [result for study in studies if (result := classification_study(study, out_dir))]
    tables = []
    for dataset in dict.fromkeys(result["dataset"] for result in evaluated):
        results = [result for result in evaluated if result["dataset"] == dataset]
        table = out_dir / f"{dataset}_classification_table.md"
        table.write_text(classification_table(dataset, {r["title"]: r["summary"] for r in results}))
        for result in results:
            for artifact in (table, result["roc"]):
                result["runs"].client.log_artifact(result["parent_id"], str(artifact), artifact_path="report")
        tables.append(table)
    return tables


def report() -> list[Path]:
    """Reports for every study in params.yaml that has test results."""
    out_dir = resolve_path(REPORTS_ROOT)
    out_dir.mkdir(parents=True, exist_ok=True)
    studies = load_params()["studies"]
    of_task = {task: [s for s in studies if studies[s]["task"] == task] for task in ("segmentation", "classification")}
    tables = [t for study in of_task["segmentation"] if (t := report_study(study, out_dir))]
    tables += classification_reports(of_task["classification"], out_dir)
    for table in tables:
        print(table.read_text())
    return tables


def main() -> None:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    report()


if __name__ == "__main__":
    main()
