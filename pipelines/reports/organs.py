"""Which studies share one of the paper's Table 2 (organ datasets), and how its columns are titled.

Organ studies are segmentation studies scored per class (no `evaluate.regions`); studies reading the
same raw dataset (AMOS CT and AMOS MR) share one table with their test sets side by side, as the
paper prints "CT-Test" and "MRI-Test".
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from pipelines import workspace
from pipelines.params import StudySpec


def organ_groups(studies: list[StudySpec]) -> dict[str, list[StudySpec]]:
    """Evaluated organ studies grouped by the raw dataset they read, named after its layout (and folder).

    Organ studies are the segmentation studies without `evaluate.regions` in params.yaml."""
    groups: dict[tuple[str, str], list[StudySpec]] = defaultdict(list)
    for study in studies:
        evaluated = workspace.path(workspace.TEST_SUMMARY, study=study.name).is_file()
        if study.task == "segmentation" and not study.evaluate.regions and evaluated:
            groups[(study.dataset.layout, study.dataset.root)].append(study)
    names = [layout for layout, _ in groups]
    return {(layout if names.count(layout) == 1 else f"{layout}-{Path(root).name}"): members
            for (layout, root), members in groups.items()}


def test_set_label(study: StudySpec) -> str:
    """"CT-Test" / "MR-Test" for a study of one modality (the paper's column names), else the study name."""
    modality = study.dataset.reader.get("modality")
    return f"{modality}-Test" if modality else study.name

