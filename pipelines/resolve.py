"""A study's dataset-dependent settings made concrete from its prepared dataset, for every stage
that trains, predicts or reports.

- `train.patch_size: auto` / `train.batch_size: auto`: the plan's (`data/preprocessed/<study>/plan.json`);
  explicit values still win.
- then the task's own (`Task.resolve`): for segmentation, `train.label_probabilities: uniform`
  (every label of the dataset equally likely as a patch centre) and, without `evaluate.regions`,
  one region per foreground class named after dataset.json.
"""

from __future__ import annotations

from pipelines import workspace
from pipelines.params import AUTO, StudySpec
from pipelines.tasks import get_task


def resolve_study(study: StudySpec) -> StudySpec:
    """The study with `auto` settings replaced (see the module doc)."""
    plan = workspace.load_plan(study.name)
    update = {}
    for key in ("patch_size", "batch_size"):
        if getattr(study.train, key) == AUTO:
            if plan is None:
                raise ValueError(f"study {study.name}: train.{key} is 'auto' but the study has no plan "
                                 f"({workspace.path(workspace.PLAN, study=study.name)})")
            update[key] = tuple(plan[key]) if key == "patch_size" else plan[key]
    study = study.model_copy(update={"train": study.train.model_copy(update=update)})
    return get_task(study.task).resolve(study, workspace.load_index(study.name))
