"""DVC stage `report`: paper-style tables and plots for every evaluated study.

For a segmentation study: a markdown table in the shape of the paper's Table 1 (Dice and HD95
per region, or per organ, mean ± std over seeds, one row per ablation variant), the same for NSD,
a PNG bar chart with error bars and PNG overlays of a few test cases (image, ground truth, each
variant); for organ datasets also the paper's Table 2 (parameters, GFLOPs, mDice and mNSD per test
set, AMOS CT and MR side by side). For a landmark study: a table in the shape of Table 4 (MRE in mm per
landmark and averaged, mean ± std over seeds) and a PNG of predicted vs true points on three
orthogonal slices of a test case. Tables and plots are also attached to the study's MLflow parent run.
For the classification studies of a dataset: one table in the shape of the paper's Table 3 (ACC,
F1, AUC of each study side by side, e.g. NC vs AD and sMCI vs pMCI) and a ROC curve PNG per study.
Across tasks: the paper's Table 5 (`report.ablation` names the study of each task) as markdown and
PNG (pipelines/report_ablation.py).

    python -m pipelines.report
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from sklearn.metrics import roc_curve  # noqa: E402

from nnmamba.data.readers.landmarks import read_landmarks  # noqa: E402
from nnmamba.data.layouts import get_layout  # noqa: E402
from nnmamba.heatmaps import world_to_voxel  # noqa: E402
from pipelines.config import load_params, resolve_path, study_config  # noqa: E402
from pipelines.evaluate import PREDICTIONS_ROOT, load_summary, probability_columns  # noqa: E402
from pipelines.prepare import PREPROCESSED_ROOT  # noqa: E402
from pipelines.report_organs import PAPER_PATCH, organ_groups, test_set_label, variant_complexity  # noqa: E402
from pipelines.report_overlays import overlay_figure  # noqa: E402
from pipelines.report_ablation import ablation_report  # noqa: E402
from pipelines.resolve import resolve_study  # noqa: E402
from pipelines.tables import VARIANT_LABELS, cell, markdown_table  # noqa: E402
from pipelines.tracking import StudyRuns  # noqa: E402
from pipelines.train import METRICS_ROOT, MODELS_ROOT, TRIALS_FILE, load_trials, trial_dir_name  # noqa: E402

REPORTS_ROOT = "reports"


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


def segmentation_report(study: str, config: dict, summary: dict, trials: list[dict], out_dir: Path) -> list[Path]:
    """Table 1-shaped tables, the Dice chart and the overlays; the table first.

    A study without a labelled test case (AMOS imagesTs) gets a note instead of tables.
    """
    regions = list(config["evaluate"]["regions"])
    table, chart = out_dir / f"{study}_table.md", out_dir / f"{study}_dice.png"
    files = [table]
    if summary:
        table.write_text(segmentation_tables(study, summary, regions))
        dice_chart(study, summary, regions, chart)
        files.append(chart)
    else:
        table.write_text(f"## {study}\n\nNo labelled test case: the predictions in predictions/{study}/ are for "
                         "the dataset's own evaluation (AMOS: the challenge site).\n")
    overlays = overlay_figure(study, load_params()["report"]["overlay_cases"], out_dir / f"{study}_overlays.png")
    return files + ([overlays] if overlays else [])


def organ_table(group: str, studies: list[str]) -> str:
    """The paper's Table 2 for studies of one organ dataset: size, compute, mDice and mNSD per test set."""
    configs = {s: resolve_study(study_config(s)) for s in studies}
    summaries = {s: load_summary(s) for s in studies}
    header = ["Method", "Params (M)", "GFLOPs 1×128³"]
    for study, config in configs.items():
        patch = "×".join(str(p) for p in config["train"]["patch_size"])
        label = test_set_label(config)
        header += [f"{label} GFLOPs 1×{patch}", f"{label} mDice (%)", f"{label} mNSD (%)"]
    rows = []
    for variant, measured in variant_complexity(studies[0]).items():
        row = [VARIANT_LABELS.get(variant, variant), f"{measured['parameters'] / 1e6:.2f}",
               f"{measured['macs'](PAPER_PATCH) / 1e9:.2f}"]
        for study, config in configs.items():
            stats = summaries[study].get(variant)
            row += [f"{measured['macs'](config['train']['patch_size']) / 1e9:.2f}",
                    cell(stats["test_dice_mean"], 100) if stats else "–",
                    cell(stats["test_nsd_mean"], 100) if stats else "–"]
        rows.append(row)
    return (f"## {group}: parameters, compute and mean Dice / NSD over organs per test set (paper Table 2)\n\n"
            "GFLOPs are multiply-adds of one forward pass (the paper's \"FLOPs\"); metrics are mean ± std over "
            "seeds of the mean over test cases.\n\n" + markdown_table(header, rows))


def spaced(name: str) -> str:
    """The paper's column titles: "TCD1" -> "TCD 1"."""
    return re.sub(r"(\D)(\d+)$", r"\1 \2", name)


def landmark_table(study: str, summary: dict, names: list[str]) -> str:
    """Table 4 shape: MRE (mm) per landmark and averaged, one row per ablation variant."""
    header = ["Method"] + [spaced(n) for n in names] + ["Average"]
    rows = [[VARIANT_LABELS.get(v, v)] + [cell(summary[v][f"test_mre_mm_{n}"]) for n in names + ["mean"]]
            for v in summary]
    return f"## {study}: MRE (mm), mean ± std over seeds\n\n" + markdown_table(header, rows)


def landmark_figure(study: str, names: list[str], trials: list[dict], path: Path) -> None:
    """Predicted (x) vs true (o) points of the first test case, projected on the axial, coronal and sagittal
    slices through the true points' centroid; one row per variant (its first seed)."""
    index = json.loads((resolve_path(PREPROCESSED_ROOT) / study / "dataset.json").read_text())
    shown: dict[str, dict] = {}
    for trial in sorted(trials, key=lambda t: t["seed"]):
        shown.setdefault(trial["variant"], trial)
    folders = {v: resolve_path(PREDICTIONS_ROOT) / study / trial_dir_name(v, t["seed"]) for v, t in shown.items()}
    case_id = min(p.stem for p in next(iter(folders.values())).glob("*.json"))
    image = nib.load(resolve_path(PREPROCESSED_ROOT) / study / index["cases"][case_id]["image"])
    volume, affine = np.asarray(image.dataobj, dtype=np.float32), image.affine
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    true_mm = np.array([index["cases"][case_id]["landmarks_mm"][n] for n in names])
    truth = world_to_voxel(affine, true_mm)
    centre = np.clip(np.round(truth.mean(axis=0)).astype(int), 0, np.array(volume.shape) - 1)
    planes = (("axial", 2, (0, 1)), ("coronal", 1, (0, 2)), ("sagittal", 0, (1, 2)))
    colours = plt.cm.tab10(np.arange(len(names)) % 10)
    fig, axes = plt.subplots(len(shown), 3, figsize=(11, 3.6 * len(shown)), squeeze=False)
    for row, (variant, folder) in enumerate(folders.items()):
        points = read_landmarks(folder / f"{case_id}.json", names, case_id)
        predicted_mm = np.array([points[n] for n in names])
        predicted = world_to_voxel(affine, predicted_mm)
        mre = np.linalg.norm(predicted_mm - true_mm, axis=1).mean()
        for col, (plane, axis, (h, v)) in enumerate(planes):
            ax = axes[row, col]
            ax.imshow(np.take(volume, centre[axis], axis=axis).T, origin="lower", cmap="gray",
                      aspect=spacing[v] / spacing[h])
            ax.autoscale(False)  # the slice's extent, whatever the points
            ax.scatter(truth[:, h], truth[:, v], s=60, facecolors="none", edgecolors=colours, linewidths=1.5)
            ax.scatter(predicted[:, h], predicted[:, v], s=50, c=colours, marker="x")
            ax.set_title(f"{VARIANT_LABELS.get(variant, variant)} seed {shown[variant]['seed']}: {plane}"
                         + (f", MRE {mre:.1f} mm" if col == 0 else ""), fontsize=9)
            ax.set_xticks([])
            ax.set_yticks([])
    handles = [plt.Line2D([], [], color=c, marker="o", linestyle="", label=n) for n, c in zip(names, colours)]
    fig.legend(handles=handles, loc="lower center", ncol=len(names), fontsize=8,
               title="o true, x predicted (projected onto the slice)", title_fontsize=8)
    fig.suptitle(f"{study}: test case {case_id}")
    fig.tight_layout(rect=(0, 0.06, 1, 0.97))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def landmark_report(study: str, config: dict, summary: dict, trials: list[dict], out_dir: Path) -> list[Path]:
    """Table 4-shaped MRE table and the predicted-vs-true slices; the table first."""
    names = list(get_layout(config["dataset"]["layout"]).labels.values())
    table, figure = out_dir / f"{study}_table.md", out_dir / f"{study}_landmarks.png"
    table.write_text(landmark_table(study, summary, names))
    landmark_figure(study, names, trials, figure)
    return [table, figure]


STUDY_REPORTS = {"segmentation": segmentation_report, "landmark": landmark_report}


def report_study(study: str, out_dir: Path) -> Path | None:
    """Write one study's tables and plots, attach them to its MLflow parent run; None when not evaluated."""
    summary = load_summary(study)
    if summary is None:
        return None
    config = resolve_study(study_config(study))
    files = STUDY_REPORTS[config["task"]](study, config, summary, load_trials(study)["trials"], out_dir)
    attach_to_parent_runs([study], files)
    return files[0]


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
    summary = load_summary(study)
    if summary is None:
        return None
    config = study_config(study)
    title = " vs ".join(config["dataset"]["classes"])
    roc = out_dir / f"{study}_roc.png"
    roc_chart(title, pd.read_csv(resolve_path(METRICS_ROOT) / study / "test_per_case.csv"), summary, roc)
    return {"study": study, "dataset": config["dataset"]["name"], "title": title, "summary": summary, "roc": roc}


def classification_reports(studies: list[str], out_dir: Path) -> list[Path]:
    """One Table 3-shaped table per dataset over its evaluated classification studies, a ROC PNG per study."""
    evaluated = [result for study in studies if (result := classification_study(study, out_dir))]
    tables = []
    for dataset in dict.fromkeys(result["dataset"] for result in evaluated):
        results = [result for result in evaluated if result["dataset"] == dataset]
        table = out_dir / f"{dataset}_classification_table.md"
        table.write_text(classification_table(dataset, {r["title"]: r["summary"] for r in results}))
        for result in results:
            attach_to_parent_runs([result["study"]], [table, result["roc"]])
        tables.append(table)
    return tables


def attach_to_parent_runs(studies: list[str], files: list[Path]) -> None:
    """Log report files into the MLflow parent run of each of `studies` that has been trained."""
    for study in studies:
        if not (resolve_path(MODELS_ROOT) / study / TRIALS_FILE).is_file():
            continue
        trials = load_trials(study)
        runs = StudyRuns(study_config(study), trials["config_hash"])
        for path in files:
            runs.client.log_artifact(trials["parent_run_id"], str(path), artifact_path="report")


def report() -> list[Path]:
    """Reports for every study in params.yaml that has test results."""
    out_dir = resolve_path(REPORTS_ROOT)
    out_dir.mkdir(parents=True, exist_ok=True)
    studies = load_params()["studies"]
    tables = [t for study in studies if studies[study]["task"] in STUDY_REPORTS and (t := report_study(study, out_dir))]
    for group, members in organ_groups(studies).items():
        table = out_dir / f"{group}_table2.md"
        table.write_text(organ_table(group, members))
        tables.append(table)
        attach_to_parent_runs(members, [table])
    tables += classification_reports([s for s in studies if studies[s]["task"] == "classification"], out_dir)
    ablation_studies = load_params()["report"]["ablation"]
    ablation = ablation_report(ablation_studies, out_dir)
    attach_to_parent_runs([s for s in ablation_studies.values() if s in studies], ablation)
    tables += ablation[:1]
    for table in tables:
        print(table.read_text())
    return tables


def main() -> None:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    report()


if __name__ == "__main__":
    main()
