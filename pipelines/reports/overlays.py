"""PNG overlays of test predictions: for a few test cases, the image, the ground truth and every variant's prediction.

All volumes are read in their raw geometry (where `evaluate` wrote the predictions), brought to
canonical RAS orientation together, and cut along the axial slice with the most labelled voxels
(the most predicted ones for an unlabelled case). Labels are drawn in one fixed colour per class
over the image, windowed to its 1st-99th intensity percentiles, with a key of label names under the
panels; each panel names the case and the image's modality, or the row and the seed it shows.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torchio as tio  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

from nnmamba.predict import file_ending  # noqa: E402
from pipelines import workspace  # noqa: E402
from pipelines.reports.figures import save_png  # noqa: E402
from pipelines.reports.tables import row_label  # noqa: E402

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
    labels = {int(value): name for value, name in index["labels"].items()}
    n_labels = len(labels)
    fig, axes = plt.subplots(len(cases), 2 + len(first_seed), figsize=(2.6 * (2 + len(first_seed)), 2.8 * len(cases)),
                             squeeze=False)
    titles = [_trial_title(variant, *trial) for variant, trial in first_seed.items()]
    for row, case_id in zip(axes, cases):
        entry = index["cases"][case_id]
        modality, image_file = next(iter(entry["raw_images"].items()))
        image_path = Path(image_file)
        name = f"{case_id}{file_ending(image_path)}"
        predictions = {variant: workspace.trial_predictions(study, variant, *trial) / name
                       for variant, trial in first_seed.items()}
        if not all(p.is_file() for p in predictions.values()):
            plt.close(fig)
            return None
        volumes = _canonical(image_path, entry["raw_label"], predictions)
        _draw_row(row, f"{case_id} ({modality})", volumes, list(first_seed), titles, n_labels)
    _colour_key(fig, labels)
    fig.tight_layout(rect=(0, 0.08 if len(cases) == 1 else 0.04, 1, 1))
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


def _trial_title(variant: str, seed: int, fold: int | None) -> str:
    """A prediction panel's title: the row as the tables name it, and which trial drew it."""
    return f"{row_label(variant)}, seed {seed}" + (f", fold {fold}" if fold is not None else "")


def _label_colours(n_labels: int) -> ListedColormap:
    """One fixed colour per label value (0 = background, never drawn)."""
    return ListedColormap(plt.get_cmap("tab20")(np.arange(max(n_labels, 2)) % 20))


def _colour_key(fig, labels: dict[int, str]) -> None:
    """A legend under the panels: each foreground label's colour and name."""
    colours = _label_colours(len(labels))
    handles = [Patch(facecolor=colours(value), alpha=LABEL_ALPHA, label=name)
               for value, name in sorted(labels.items()) if value != 0]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 8), fontsize=7, frameon=False)


def _draw_row(row: np.ndarray, case_title: str, volumes: dict, variants: list[str], titles: list[str],
              n_labels: int) -> None:
    reference = volumes["truth"] if volumes["truth"] is not None else volumes["predictions"][variants[0]]
    z = int(np.argmax((reference > 0).sum(axis=(0, 1))))
    image = volumes["image"][:, :, z]
    low, high = np.percentile(image, WINDOW_PERCENTILES)
    colours = _label_colours(n_labels)
    panels = ([("image", None), ("ground truth", volumes["truth"])]
              + [(title, volumes["predictions"][v]) for v, title in zip(variants, titles)])
    for axis, (title, labels) in zip(row, panels):
        axis.imshow(image.T, cmap="gray", vmin=low, vmax=high, origin="lower", aspect=volumes["aspect"])
        if labels is not None:
            shown = np.ma.masked_equal(labels[:, :, z].T, 0)
            axis.imshow(shown, cmap=colours, vmin=0, vmax=max(n_labels - 1, 1), alpha=LABEL_ALPHA, origin="lower",
                        aspect=volumes["aspect"], interpolation="nearest")
        elif title == "ground truth":
            axis.text(0.5, 0.5, "unlabelled", ha="center", va="center", transform=axis.transAxes, color="white")
        axis.set_title(f"{case_title} z={z}" if title == "image" else title, fontsize=8)
        axis.axis("off")
