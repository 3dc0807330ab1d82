"""A report figure written as a PNG file, whole or not at all."""

from __future__ import annotations

import io
from pathlib import Path

import matplotlib.pyplot as plt
from matplotlib.figure import Figure

from nnmamba.atomic import write_file


def save_png(fig: Figure, path: Path, dpi: int) -> None:
    """Render `fig` in memory, replace `path` with it atomically (a full disk names `path`) and close it."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    plt.close(fig)
    write_file(path, buffer.getbuffer())
