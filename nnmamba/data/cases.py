"""Layout-independent description of one case on disk.

Every raw-layout reader (BraTS, AMOS, nnU-Net/MSD, ...) turns its folder
structure into a list of :class:`CaseFiles`; preprocessing only ever sees this,
which keeps it free of layout-specific knowledge.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class CaseFiles:
    """The files of one case.

    ``images`` maps a channel name (e.g. a modality) to its file; the mapping's
    order is the channel order of the stacked network input. ``label`` is the
    segmentation file, or ``None`` for unlabelled (test) cases. ``subset`` is
    the split the dataset itself assigns (``"train"``, ``"val"``, ``"test"``:
    AMOS's imagesTr/imagesVa/imagesTs folders), ``None`` where it assigns none;
    keyword-only, so subclasses (landmark cases) can still add required fields.
    """

    case_id: str
    images: dict[str, Path]
    label: Path | None
    subset: str | None = field(default=None, kw_only=True)

    def files(self) -> list[Path]:
        """Every file of the case (images, then the label), e.g. to check they lie inside the dataset root."""
        return [*self.images.values(), *([self.label] if self.label is not None else [])]


@dataclass(frozen=True)
class RawDataset:
    """A raw dataset as a reader found it: its cases and the names its own metadata gives.

    ``labels`` maps every label value to its name (0 = background) and
    ``channels`` names the image channels in input order; layouts with a
    ``dataset.json`` (AMOS, nnU-Net, MSD) take both from it.
    """

    cases: list[CaseFiles]
    labels: dict[int, str]
    channels: tuple[str, ...]


@dataclass(frozen=True)
class ClassifiedCase(CaseFiles):
    """A case whose label is one class for the whole image (classification), not a label map.

    ``subject`` groups the cases (visits) of one person, so splits can keep them together;
    ``class_name`` is the case's class, e.g. a diagnosis.
    """

    subject: str
    class_name: str
