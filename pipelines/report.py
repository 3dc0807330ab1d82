"""DVC stage `report`: paper-style tables and plots for every evaluated study, in `reports/`.

Each task writes its own (pipelines/reports/): segmentation the paper's Table 1 per study (Dice
and HD95 per region or organ, mean ± std over seeds; NSD; a Dice bar chart; test-case overlays)
and Table 2 per organ dataset (parameters, GFLOPs, mDice and mNSD per test set, AMOS CT and MR
side by side); landmark detection Table 4 (MRE per landmark) and predicted vs true points;
classification Table 3 per dataset (ACC, F1, AUC of its studies side by side) and ROC curves.
Across tasks: the paper's Table 5 (`report.ablation` names the study of each task) as markdown
and PNG. Tables and plots are also attached to each study's MLflow parent run.

    python -m pipelines.report
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from nnmamba.atomic import WriteError, staged_directory
from pipelines import workspace
from pipelines.params import load_params
from pipelines.reports.ablation import ablation_report
from pipelines.reports.paper import load_paper_numbers
from pipelines.tasks import TASK_NAMES, get_task
from pipelines.tracking import attach_to_parent_run


def report() -> list[Path]:
    """Reports for every study in params.yaml that has test results; returns the tables, printed too.

    `reports/` is written beside the old one and replaces it as a whole once complete
    (nnmamba.atomic): a failure leaves the previous reports as they were, and no report of a study
    evaluated no more stays behind.
    """
    out_dir = workspace.resolve(workspace.REPORTS)
    params = load_params()
    evaluated = [study for study in params.studies.values() if workspace.load_summary(study.name) is not None]
    with staged_directory(out_dir) as partial:
        tables = []
        for task in TASK_NAMES:
            studies = [study for study in evaluated if study.task == task]
            tables += get_task(task).report(studies, params.report, partial)
        ablation = ablation_report(dict(params.report.ablation), partial,
                                   load_paper_numbers(params.report.paper_numbers))
        for study in params.studies.values():
            if study.name in params.report.ablation.values():
                attach_to_parent_run(study, ablation)
        tables += ablation[:1]
        for table in tables:
            print(table.read_text())
    return [out_dir / table.relative_to(partial) for table in tables]


def main() -> None:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    try:
        report()
    except WriteError as error:
        sys.exit(f"report: {error}")


if __name__ == "__main__":
    main()
