"""The workspace module owns every artifact path: dvc.yaml names the same ones, and no stage imports another."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipelines import workspace
from pipelines.tasks import TASK_MODULES

REPO = Path(__file__).resolve().parent.parent
DVC = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
CODE = ("pipelines", "nnmamba", "ray_configs")


def dvc(template: str, **fields: str) -> str:
    """A workspace template as dvc.yaml spells it, `${key}` for the foreach key."""
    return template.format(**({"study": "${key}", "name": "${key}"} | fields))


def root_of(template: str) -> str:
    return template.split("/{")[0]


EXPECTED = {
    "synthesize": {"deps": set(), "outs": {dvc(workspace.SYNTHETIC)}},
    "prepare": {"deps": {dvc(workspace.SYNTHETIC, name="${item.dataset.synthetic}")},
                "outs": {dvc(workspace.PREPROCESSED)}},
    "split": {"deps": {dvc(workspace.DATASET_INDEX)}, "outs": {dvc(workspace.SPLIT)}},
    "train": {"deps": {dvc(workspace.PREPROCESSED), dvc(workspace.SPLIT), "${item.init}"},
              "outs": {dvc(workspace.MODELS)}, "plots": {dvc(workspace.TRAIN_CURVES)}},
    "evaluate": {"deps": {dvc(workspace.MODELS), dvc(workspace.PREPROCESSED), dvc(workspace.SPLIT)},
                 "outs": {dvc(workspace.TEST_PER_CASE), dvc(workspace.TEST_ENSEMBLE_PER_CASE),
                          dvc(workspace.PREDICTIONS), dvc(workspace.TEST_SUMMARY),
                          dvc(workspace.TEST_ENSEMBLE_SUMMARY)},
                 "metrics": {dvc(workspace.HEADLINE)}},
    "report": {"deps": {root_of(t) for t in (workspace.METRICS, workspace.MODELS, workspace.PREDICTIONS,
                                              workspace.PREPROCESSED)},
               "outs": {workspace.REPORTS}},
}


def stage_body(stage: dict) -> dict:
    return stage.get("do", stage)


def paths(entries: list) -> set[str]:
    """The paths of a deps/outs list, whose items are strings or {path: options}."""
    return {entry if isinstance(entry, str) else next(iter(entry)) for entry in entries}


def test_dvc_yaml_deps_and_outs_are_the_workspace_paths():
    assert set(DVC) == set(EXPECTED)
    for name, expected in EXPECTED.items():
        body = stage_body(DVC[name])
        for kind in ("deps", "outs", "metrics", "plots"):
            written = {p for p in paths(body.get(kind, [])) if not p.startswith(CODE)}
            assert written == expected.get(kind, set()), f"dvc.yaml stage {name} {kind}"


def stage_modules() -> dict[str, Path]:
    """Every module a dvc.yaml stage runs (`python -m pipelines.<stage> ...`)."""
    modules = {}
    for stage in DVC.values():
        module = stage_body(stage)["cmd"].split()[2]
        modules[module] = REPO / (module.replace(".", "/") + ".py")
    return modules


def imported_modules(path: Path) -> set[str]:
    """Project modules named by any import statement of a file, including imports inside functions."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names |= {f"{node.module}.{alias.name}" for alias in node.names}
    return {name for name in names if name.startswith("pipelines")}


def module_file(name: str) -> Path | None:
    base = REPO / name.replace(".", "/")
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def reachable(start: str) -> set[str]:
    """Every pipelines module `start` imports, directly or through other pipelines modules; the task
    registry imports its task modules on demand, so it counts as importing them all."""
    seen, todo = set(), [start]
    while todo:
        name = todo.pop()
        file = module_file(name)
        names = imported_modules(file) if file else set()
        if name == "pipelines.tasks":
            names |= set(TASK_MODULES.values())
        for name in names:
            if module_file(name) and name not in seen:
                seen.add(name)
                todo.append(name)
    return seen


def test_no_stage_imports_another_stage():
    stages = stage_modules()
    assert len(stages) == 6
    for stage in stages:
        others = sorted((set(stages) - {stage}) & reachable(stage))
        assert not others, f"{stage} imports the stage module(s) {others}"


def loaded_after_import(module: str, candidates: tuple[str, ...]) -> list[str]:
    """Which of `candidates` a fresh interpreter has in sys.modules after `import module`."""
    return subprocess.run(
        [sys.executable, "-c", f"import sys, {module}; print(' '.join(m for m in {candidates!r} if m in sys.modules))"],
        cwd=REPO, capture_output=True, text=True, check=True).stdout.split()


def test_the_report_stage_does_not_load_ray_train_or_the_train_stage():
    assert loaded_after_import("pipelines.report", ("pipelines.train", "pipelines.train_worker", "ray.train")) == []


@pytest.mark.parametrize("module, heavy", [
    # Every trial's Tune actor and Ray Train controller import pipelines.trial: the training code
    # (MONAI, the engine) and MLflow are for the workers and the driver only.
    ("pipelines.trial", ("monai", "mlflow", "pipelines.train_worker", "nnmamba.engine")),
    # Stages that only validate params.yaml do not pay for `import monai` (all of its submodules).
    ("pipelines.split", ("monai",)),
    ("pipelines.synthesize", ("monai",)),
])
def test_start_up_modules_leave_the_heavy_imports_to_who_needs_them(module, heavy):
    assert loaded_after_import(module, heavy) == []


def test_relative_paths_follow_the_workspace_variable(tmp_path, monkeypatch):
    monkeypatch.setenv(workspace.WORKSPACE_ENV, str(tmp_path))
    assert workspace.path(workspace.SPLIT, study="s") == tmp_path / "data/splits/s.json"
    assert workspace.resolve("/abs/data") == Path("/abs/data")
    assert workspace.trial_model("s", "miccss", 2) == tmp_path / "models/s/miccss-seed2"
