"""Cells and markdown tables shared by the report modules, in the paper's number format."""

from __future__ import annotations

from nnmamba.backbones import BACKBONES

VARIANT_LABELS = {"baseline": "Baseline", "mic": "+MIC", "miccss": "+MICCSS", "sequence": "+Sequence"}
BACKBONE_LABELS = {name: backbone.label for task in BACKBONES.values() for name, backbone in task.items()}


def row_label(row: str) -> str:
    """A table row's name: nnMamba's ablation variants as the paper's Table 5 prints them, competitor
    backbones by their published names."""
    return VARIANT_LABELS.get(row) or BACKBONE_LABELS.get(row, row)


def cell(stats: dict, scale: float = 1.0) -> str:
    """`mean ± std`, two decimals, as the paper prints them; a single trial's value as `value (n = 1)`,
    since its std of 0 would read as a measured spread."""
    if stats.get("n") == 1:
        return f"{stats['mean'] * scale:.2f} (n = 1)"
    return f"{stats['mean'] * scale:.2f} ± {stats['std'] * scale:.2f}"


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"
