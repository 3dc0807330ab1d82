"""Landmark reports: the paper's Table 4 (MRE in mm per landmark and averaged) and predicted vs true
points on three orthogonal slices of a test case."""

from __future__ import annotations

import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402

from nnmamba.atomic import write_file  # noqa: E402
from nnmamba.data.layouts import get_layout  # noqa: E402
from nnmamba.data.readers.landmarks import read_landmarks  # noqa: E402
from nnmamba.heatmaps import world_to_voxel  # noqa: E402
from pipelines import workspace  # noqa: E402
from pipelines.params import StudySpec  # noqa: E402
from pipelines.reports.complexity import COUNTER, RowComplexity, row_complexity, shape_label  # noqa: E402
from pipelines.reports.figures import figure_path, save_png  # noqa: E402
from pipelines.reports.tables import cell, markdown_table, row_label  # noqa: E402
from pipelines.tracking import attach_to_parent_run  # noqa: E402


def spaced(name: str) -> str:
    """The paper's column titles: "TCD1" -> "TCD 1"."""
    return re.sub(r"(\D)(\d+)$", r"\1 \2", name)


def landmark_table(study: str, summary: dict, names: list[str], complexity: dict[str, RowComplexity],
                   patch: tuple[int, ...]) -> str:
    """Table 4 shape: size, compute and MRE (mm) per landmark and averaged, one row per variant or backbone."""
    header = ["Method", "Params (M)", f"GMACs {shape_label(patch)}"] + [spaced(n) for n in names] + ["Average"]
    rows = [[row_label(v), *complexity[v].cells(patch)] + [cell(summary[v][f"test_mre_mm_{n}"])
                                                          for n in names + ["mean"]]
            for v in summary]
    return f"## {study}: MRE (mm), mean ± std over seeds\n\n{COUNTER}\n\n" + markdown_table(header, rows)


def landmark_figure(study: str, names: list[str], trials: list[dict], path: Path) -> None:
    """Predicted (x) vs true (o) points of the first test case, projected on the axial, coronal and sagittal
    slices through the true points' centroid; one row per variant (its first seed)."""
    index = workspace.load_index(study)
    shown: dict[str, dict] = {}
    for trial in sorted(trials, key=lambda t: (t["seed"], t.get("fold") or 0)):
        shown.setdefault(trial["variant"], trial)
    folders = {v: workspace.trial_predictions(study, v, t["seed"], t.get("fold")) for v, t in shown.items()}
    case_id = min(p.stem for p in next(iter(folders.values())).glob("*.json"))
    image = nib.load(workspace.path(workspace.PREPROCESSED, study=study) / index["cases"][case_id]["image"])
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
            ax.set_title(f"{row_label(variant)} seed {shown[variant]['seed']}: {plane}"
                         + (f", MRE {mre:.1f} mm" if col == 0 else ""), fontsize=9)
            ax.set_xticks([])
            ax.set_yticks([])
    handles = [plt.Line2D([], [], color=c, marker="o", linestyle="", label=n) for n, c in zip(names, colours)]
    fig.legend(handles=handles, loc="lower center", ncol=len(names), fontsize=8,
               title="o true, x predicted (projected onto the slice)", title_fontsize=8)
    fig.suptitle(f"{study}: test case {case_id}")
    fig.tight_layout(rect=(0, 0.06, 1, 0.97))
    save_png(fig, path, dpi=110)


def landmark_reports(studies: list[StudySpec], out_dir: Path) -> list[Path]:
    """Per evaluated study: the Table 4-shaped MRE table and the predicted-vs-true slices, attached to
    its MLflow parent run. Returns the tables."""
    tables = []
    for study in studies:
        summary = workspace.load_summary(study.name)
        if summary is None:
            continue
        names = list(get_layout(study.dataset.layout).labels.values())
        table, figure = out_dir / f"{study.name}_table.md", figure_path(out_dir, f"{study.name}_landmarks.png")
        write_file(table, landmark_table(study.name, summary, names, row_complexity(study.name),
                                          study.train.patch_size))
        landmark_figure(study.name, names, workspace.load_trials(study.name)["trials"], figure)
        attach_to_parent_run(study, [table, figure])
        tables.append(table)
    return tables
