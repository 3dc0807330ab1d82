"""The paper's published numbers, read from a YAML file (report.paper_numbers), as extra table rows
that say they are the paper's: they come from its data and training, not from this run."""

from __future__ import annotations

import yaml

from pipelines import workspace

PAPER_SUFFIX = " (paper)"


def load_paper_numbers(path: str | None) -> dict:
    """The YAML's content ({} when `path` is None); a missing or malformed file is named in the error."""
    if path is None:
        return {}
    file = workspace.resolve(path)
    try:
        numbers = yaml.safe_load(file.read_text())
    except (OSError, yaml.YAMLError) as error:
        raise ValueError(f"report.paper_numbers: cannot read {file}: {error}") from error
    if not isinstance(numbers, dict) or "source" not in numbers:
        raise ValueError(f"report.paper_numbers: {file} must be a mapping with a `source` and the tables' numbers")
    return numbers


def paper_note(numbers: dict) -> str:
    """The line under a table that has paper rows."""
    return (f"\nRows marked{PAPER_SUFFIX} are the published numbers of {numbers['source']}, from the paper's own "
            "data and training, not measured by this pipeline.\n")
