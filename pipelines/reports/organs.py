"""What the paper's Table 2 reports for organ datasets: model size and compute of each variant, per test set.

Organ studies are segmentation studies scored per class (no `evaluate.regions`); studies reading the
same raw dataset (AMOS CT and AMOS MR) share one table with their test sets side by side, as the
paper prints "CT-Test" and "MRI-Test". Parameters are counted once per shared tensor; compute is in
multiply-adds (what thop and fvcore call "FLOPs", as the paper's GFLOPs are) of one 1-sample forward
pass, at each study's training patch and at the paper's 1 x 128^3.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from nnmamba.checkpoint import ARCH_FILE, model_from_arch
from nnmamba.complexity import measure_macs
from nnmamba.models import count_parameters
from pipelines import workspace
from pipelines.params import StudySpec

PAPER_PATCH = (128, 128, 128)


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


def variant_complexity(study: str) -> dict[str, dict]:
    """Per variant: parameters and the multiply-add model, from the study's first exported bundle of it."""
    trials = workspace.load_trials(study)["trials"]
    measured = {}
    for trial in sorted(trials, key=lambda t: t["seed"]):
        if trial["variant"] in measured:
            continue
        arch = json.loads((Path(trial["model_dir"]) / ARCH_FILE).read_text())
        model = model_from_arch(arch)
        measured[trial["variant"]] = {"parameters": count_parameters(model),
                                      "macs": measure_macs(model, arch["in_channels"])}
    return measured
