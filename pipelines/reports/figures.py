"""A report figure written as a PNG file, whole or not at all."""

from __future__ import annotations

import io
from pathlib import Path

import matplotlib.pyplot as plt
from matplotlib.figure import Figure

from nnmamba.atomic import write_file

# Every report PNG goes into reports/figures/, which dvc.yaml declares as image plots: a DVC plot
# names a file or a folder (no glob), and reports/ itself also holds the markdown tables.
FIGURES = "figures"


def figure_path(out_dir: Path, name: str) -> Path:
    """Where the report figure `name` (a .png) goes under the report folder `out_dir`."""
    return out_dir / FIGURES / name


def save_png(fig: Figure, path: Path, dpi: int) -> None:
    """Render `fig` in memory, replace `path` with it atomically (a full disk names `path`) and close it."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    plt.close(fig)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_file(path, buffer.getbuffer())
