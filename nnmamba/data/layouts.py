"""Registry of raw dataset layouts: how to list a layout's cases, its labels, and its synthetic twin.

The pipeline names a layout in params.yaml (`dataset.layout`); everything layout-specific is
reached through this table, so adding a layout is one entry here plus its reader and generator.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from nnmamba.data.adni import ADNI_CHANNELS, ADNI_LABELS, find_adni_cases
from nnmamba.data.brats import BRATS_LABELS, BRATS_MODALITIES, find_brats_cases
from nnmamba.data.cases import CaseFiles


@dataclass(frozen=True)
class Layout:
    """What the pipeline needs to know about one raw layout."""

    name: str
    find_cases: Callable[[Path], list[CaseFiles]]
    labels: dict[int, str]
    channels: tuple[str, ...]
    write_synthetic: Callable[..., list[str]]
    patient_of: Callable[[str], str] = lambda case_id: case_id


def _write_synthetic_brats(root: Path, **kwargs) -> list[str]:
    from nnmamba.data.synthetic import write_synthetic_brats

    return write_synthetic_brats(root, **kwargs)


def _write_synthetic_adni(root: Path, **kwargs) -> list[str]:
    from nnmamba.data.synthetic_adni import write_synthetic_adni

    return write_synthetic_adni(root, **kwargs)


def _brats_patient(case_id: str) -> str:
    """BraTS-GLI-<patient>-<timepoint>: timepoints of one patient must stay in one split."""
    return case_id.rsplit("-", 1)[0]


LAYOUTS: dict[str, Layout] = {
    "brats2023": Layout(
        "brats2023", find_brats_cases, BRATS_LABELS, BRATS_MODALITIES, _write_synthetic_brats, _brats_patient
    ),
    # Image-level labels: `labels` are the diagnoses a manifest may use; the subject of each case
    # comes from the manifest (ClassifiedCase.subject), so splits do not need `patient_of`.
    "adni": Layout("adni", find_adni_cases, ADNI_LABELS, ADNI_CHANNELS, _write_synthetic_adni),
}


def get_layout(name: str) -> Layout:
    """The registered layout called `name`; a clear error lists the known ones."""
    if name not in LAYOUTS:
        raise ValueError(f"unknown dataset layout {name!r}; known: {sorted(LAYOUTS)}")
    return LAYOUTS[name]
