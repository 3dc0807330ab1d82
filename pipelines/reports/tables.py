"""Cells and markdown tables shared by the report modules, in the paper's number format."""

from __future__ import annotations

VARIANT_LABELS = {"baseline": "Baseline", "mic": "+MIC", "miccss": "+MICCSS", "sequence": "+Sequence"}


def cell(stats: dict, scale: float = 1.0) -> str:
    """`mean ± std`, two decimals, as the paper prints them."""
    return f"{stats['mean'] * scale:.2f} ± {stats['std'] * scale:.2f}"


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"
