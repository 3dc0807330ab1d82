"""Registry of raw dataset layouts: how to list a layout's cases, its labels, and its synthetic twin.

The pipeline names a layout in params.yaml (`dataset.layout`); everything layout-specific is
reached through this table, so adding a layout is one entry here plus its reader and generator.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nnmamba.data.readers.amos import read_amos_dataset
from nnmamba.data.readers.adni import ADNI_CHANNELS, ADNI_LABELS, find_adni_cases
from nnmamba.data.readers.brats import BRATS_LABELS, BRATS_MODALITIES, find_brats_cases
from nnmamba.data.cases import CaseFiles, RawDataset
from nnmamba.data.readers.landmarks import LANDMARK_CHANNELS, LANDMARK_NAMES, find_landmark_cases
from nnmamba.data.readers.nnunet import read_nnunet_dataset


@dataclass(frozen=True)
class Layout:
    """What the pipeline needs to know about one raw layout.

    Layouts with fixed names (BraTS) give ``find_cases``, ``labels`` and ``channels``;
    layouts that describe themselves in a ``dataset.json`` (AMOS, nnU-Net) give
    ``read_dataset`` instead, which takes the reader options of params.yaml
    (``dataset.reader``). ``read`` serves both kinds.
    """

    name: str
    find_cases: Callable[[Path], list[CaseFiles]] | None
    labels: dict[int, str]
    channels: tuple[str, ...]
    write_synthetic: Callable[..., list[str]]
    patient_of: Callable[[str], str] = lambda case_id: case_id
    read_dataset: Callable[..., RawDataset] | None = None

    def read(self, root: Path, **options: Any) -> RawDataset:
        """The raw dataset at ``root``: cases, label names, channel names."""
        if self.read_dataset is not None:
            return self.read_dataset(Path(root), **options)
        if options:
            raise ValueError(f"layout {self.name!r} takes no reader options, got {sorted(options)}")
        return RawDataset(self.find_cases(Path(root)), dict(self.labels), tuple(self.channels))


def _write_synthetic_brats(root: Path, **kwargs) -> list[str]:
    from nnmamba.data.synthetic.brats import write_synthetic_brats

    return write_synthetic_brats(root, **kwargs)


def _write_synthetic_amos(root: Path, **kwargs) -> list[str]:
    from nnmamba.data.synthetic.amos import write_synthetic_amos

    return write_synthetic_amos(root, **kwargs)


def _write_synthetic_nnunet(root: Path, **kwargs) -> list[str]:
    from nnmamba.data.synthetic.nnunet import write_synthetic_nnunet

    return write_synthetic_nnunet(root, **kwargs)


def _write_synthetic_fetal(root: Path, **kwargs) -> list[str]:
    from nnmamba.data.synthetic.fetal import write_synthetic_fetal

    return write_synthetic_fetal(root, **kwargs)


def _write_synthetic_adni(root: Path, **kwargs) -> list[str]:
    from nnmamba.data.synthetic.adni import write_synthetic_adni

    return write_synthetic_adni(root, **kwargs)


def _brats_patient(case_id: str) -> str:
    """BraTS-GLI-<patient>-<timepoint>: timepoints of one patient must stay in one split."""
    return case_id.rsplit("-", 1)[0]


LAYOUTS: dict[str, Layout] = {
    "brats2023": Layout(
        "brats2023", find_brats_cases, BRATS_LABELS, BRATS_MODALITIES, _write_synthetic_brats, _brats_patient
    ),
    # Labels and channels come from each dataset's dataset.json (empty here).
    "amos22": Layout("amos22", None, {}, (), _write_synthetic_amos,
                     read_dataset=read_amos_dataset),
    "nnunet": Layout("nnunet", None, {}, (), _write_synthetic_nnunet,
                     read_dataset=read_nnunet_dataset),
    # Labels are the landmark names: output channel k is the heatmap of landmark k.
    "landmarks": Layout(
        "landmarks", find_landmark_cases, dict(enumerate(LANDMARK_NAMES)), LANDMARK_CHANNELS, _write_synthetic_fetal
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
