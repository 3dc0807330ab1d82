"""PNG overlays of test predictions: for a few test cases, the image, the ground truth and every variant's prediction.

All volumes are read in their raw geometry (where `evaluate` wrote the predictions), brought to
canonical RAS orientation together, and cut along the axial slice with the most labelled voxels
(the most predicted ones for an unlabelled case). Labels are drawn in one fixed colour per class
over the image, windowed to its 1st-99th intensity percentiles.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torchio as tio  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402

from nnmamba.predict import file_ending  # noqa: E402
from pipelines import workspace  # noqa: E402
from pipelines.reports.figures import save_png  # noqa: E402

LABEL_ALPHA = 0.55
WINDOW_PERCENTILES = (1, 99)


def overlay_figure(study: str, n_cases: int, path: Path) -> Path | None:
    """Write the study's overlay PNG; None when it has no predictions to show."""
    index = workspace.load_index(study)
    trials = workspace.load_trials(study)["trials"]
    first_seed = {}
    for trial in sorted(trials, key=lambda t: (t["variant"], t["seed"], t.get("fold") or 0)):
        first_seed.setdefault(trial["variant"], (trial["seed"], trial.get("fold")))
    test = workspace.load_split(study)["test"]
    # Labelled cases first: they show the ground truth next to the predictions.
    cases = sorted(test, key=lambda c: (index["cases"][c]["raw_label"] is None, c))[:n_cases]
    if not cases:
        return None
    n_labels = len(index["labels"])
    fig, axes = plt.subplots(len(cases), 2 + len(first_seed), figsize=(2.6 * (2 + len(first_seed)), 2.8 * len(cases)),
                             squeeze=False)
    for row, case_id in zip(axes, cases):
        entry = index["cases"][case_id]
        image_path = Path(next(iter(entry["raw_images"].values())))
        name = f"{case_id}{file_ending(image_path)}"
        predictions = {variant: workspace.trial_predictions(study, variant, *trial) / name
                       for variant, trial in first_seed.items()}
        if not all(p.is_file() for p in predictions.values()):
            plt.close(fig)
            return None
        volumes = _canonical(image_path, entry["raw_label"], predictions)
        _draw_row(row, case_id, volumes, list(first_seed), n_labels)
    fig.tight_layout()
    save_png(fig, path, dpi=110)
    return path


def _canonical(image_path: Path, label_path: str | None, predictions: dict[str, Path]) -> dict:
    """Image, truth (or None) and predictions as canonical RAS arrays, plus the in-plane aspect ratio."""
    subject = tio.Subject(image=tio.ScalarImage(image_path),
                          **{f"pred_{v}": tio.LabelMap(p) for v, p in predictions.items()})
    if label_path is not None:
        subject.add_image(tio.LabelMap(label_path), "truth")
    canonical = tio.ToCanonical()(subject)
    spacing = canonical["image"].spacing
    return {
        "image": canonical["image"].numpy()[0],
        "truth": canonical["truth"].numpy()[0] if label_path is not None else None,
        "predictions": {v: canonical[f"pred_{v}"].numpy()[0] for v in predictions},
        "aspect": spacing[1] / spacing[0],
    }


def _draw_row(row: np.ndarray, case_id: str, volumes: dict, variants: list[str], n_labels: int) -> None:
    reference = volumes["truth"] if volumes["truth"] is not None else volumes["predictions"][variants[0]]
    z = int(np.argmax((reference > 0).sum(axis=(0, 1))))
    image = volumes["image"][:, :, z]
    low, high = np.percentile(image, WINDOW_PERCENTILES)
    colours = ListedColormap(plt.get_cmap("tab20")(np.arange(max(n_labels, 2)) % 20))
    panels = [("image", None), ("ground truth", volumes["truth"])] + [(v, volumes["predictions"][v]) for v in variants]
    for axis, (title, labels) in zip(row, panels):
        axis.imshow(image.T, cmap="gray", vmin=low, vmax=high, origin="lower", aspect=volumes["aspect"])
        if labels is not None:
            shown = np.ma.masked_equal(labels[:, :, z].T, 0)
            axis.imshow(shown, cmap=colours, vmin=0, vmax=max(n_labels - 1, 1), alpha=LABEL_ALPHA, origin="lower",
                        aspect=volumes["aspect"], interpolation="nearest")
        elif title == "ground truth":
            axis.text(0.5, 0.5, "unlabelled", ha="center", va="center", transform=axis.transAxes, color="white")
        axis.set_title(f"{case_id} z={z}" if title == "image" else title, fontsize=8)
        axis.axis("off")
