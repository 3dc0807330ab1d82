"""params.yaml, parsed and validated once into frozen, typed specs; the only reader of params.yaml.

Resolution order of a study's sections (later wins):
1. the shared top-level sections (`prepare`, `split`, `model`, `train`, `evaluate`),
2. the study's own overrides (`studies.<name>.<section>`); `task` and `init` (where the trials'
   starting weights come from) are per study only,
with the active profile (`profile: <name>`, overlay `profiles.<name>`) deep-merged over the whole
file first. A user switches to the paper's settings with `dvc exp run -S profile=paper`; DVC
tracks `profile` and `profiles`, so the right stages re-run. The `ray` section is filled from its
scaling preset (`ray.preset`, a file in ray_configs/presets/), keys written in params.yaml winning.

Every study is validated when the file is loaded, whichever stage loads it: an unknown or
misspelt key, a missing one or a wrong type stops with a ParamsError that names the key where it
was written (`profiles.paper.train.epcohs`), the file, and the close matches. Validation is
pydantic's; the library's own typed settings (`PlanSettings`) are fields here.
"""

from __future__ import annotations

import copy
import difflib
import types
import typing
from dataclasses import fields as dataclass_fields, is_dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from nnmamba.backbones import NNMAMBA, UNAVAILABLE, available_backbones, get_backbone
from nnmamba.data.loading.augmentation import Augmentation
from nnmamba.data.preprocessing.plan import PlanSettings
from nnmamba.losses import SEGMENTATION_LOSSES
from pipelines.tasks import TASK_NAMES
from pipelines.workspace import REPO_ROOT, trial_name

PARAMS_FILE = REPO_ROOT / "params.yaml"
PRESETS_DIR = REPO_ROOT / "ray_configs" / "presets"
STUDY_SECTIONS = ("prepare", "split", "model", "train", "evaluate")
AUTO = "auto"


class ParamsError(ValueError):
    """A params.yaml (or scaling preset) that does not describe a runnable pipeline."""


class Spec(BaseModel):
    """A frozen section: unknown keys are errors, values are type-checked."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class DatasetSpec(Spec):
    name: str                                   # MLflow experiment: nnmamba-<task>-<name>
    layout: str                                 # raw layout reader (nnmamba/data/layouts.py)
    root: str
    synthetic: str                              # the synthetic twin DVC tracks beside it
    reader: dict[str, Any] = {}                 # the layout reader's options
    classes: tuple[str, ...] | None = None      # classification: class 0, class 1, ...
    experiment: str | None = None               # MLflow experiment name, instead of the default


class PrepareSpec(Spec):
    crop_margin: int
    image_interpolation: Literal["linear", "bspline"]
    fingerprint_samples_per_case: int
    fingerprint_seed: int
    workers: int = 1                            # segmentation: processes preprocessing cases side by side
    spacing: tuple[float, float, float] | None = None   # landmark and classification studies
    shape: tuple[int, int, int] | None = None           # classification: crop or pad to this


class SplitSpec(Spec):
    method: Literal["random", "folders", "kfold"] = "random"
    seed: int
    val: int | float                            # cases (int) or a fraction (< 1); kfold: unused (the folds validate)
    test: int | float
    folds: int = 5                              # kfold: folds of the non-test cases, each one trial per model and seed


class ModelSpec(Spec):
    base_channels: int
    blocks_per_stage: int
    d_state: int
    d_conv: int
    expand: int
    sequence_d_conv: int | None = None          # classification only
    dropout: float | None = None                # classification only

    def kwargs(self) -> dict[str, Any]:
        """The keyword arguments of `nnmamba.models.build_model` (the options that are set)."""
        return self.model_dump(exclude_none=True)


class OptimizerSpec(Spec):
    name: Literal["adam", "adamw", "sgd"]
    lr: float
    weight_decay: float
    momentum: float = 0.0                       # sgd only
    nesterov: bool = False                      # sgd only
    schedule: Literal["constant", "poly"] = "constant"   # poly: nnU-Net's lr * (1 - epoch / epochs) ** 0.9

    @model_validator(mode="after")
    def _sgd_settings(self) -> OptimizerSpec:
        if self.name != "sgd" and (self.momentum or self.nesterov):
            raise ValueError(f"momentum and nesterov are SGD settings; optimizer {self.name!r} takes neither")
        return self


class HeatmapSpec(Spec):
    sigma_mm: float
    foreground_weight: float


class TrainSpec(Spec):
    backbones: tuple[str, ...] = (NNMAMBA,)     # nnmamba (its `variants`) and competitors (nnmamba/backbones.py)
    backbone_options: dict[str, dict[str, Any]] = {}   # per competitor: options of its constructor
    recipe: Literal["own", "shared"] = "own"    # own: each backbone its published optimizer and loss; shared: nnMamba's
    backbone_optimizers: dict[str, OptimizerSpec] = {}   # recipe own: a competitor's optimizer, instead of its own
    backbone_losses: dict[str, Literal[SEGMENTATION_LOSSES]] = {}   # recipe own: a competitor's segmentation loss
    variants: tuple[str, ...]                   # nnMamba's ablation variants
    seeds: tuple[int, ...]
    epochs: int
    steps_per_epoch: int
    batch_size: int | Literal["auto"]
    patch_size: tuple[int, int, int] | Literal["auto"]
    samples_per_volume: int
    queue_length: int
    label_probabilities: dict[int, float] | Literal["uniform"]
    optimizer: OptimizerSpec
    amp: Literal["none", "bf16", "fp16"]
    channels_last: bool
    cuda_graph: bool
    val_every: int
    val_overlap: float
    data_workers: int
    augmentation: Augmentation
    divergence_factor: float = Field(gt=1)      # an epoch's loss above this x the first step's fails the trial
    heatmap: HeatmapSpec | None = None          # landmark studies

    def patch_sampling(self) -> dict[str, Any]:
        """The keywords the library's patch loaders share (`make_patch_loader`, `make_heatmap_loader`)."""
        return {"patch_size": tuple(self.patch_size), "batch_size": self.batch_size,
                "samples_per_volume": self.samples_per_volume, "queue_length": self.queue_length,
                "label_probabilities": dict(self.label_probabilities), "augmentation": self.augmentation,
                "num_workers": self.data_workers}

    def grid_free(self) -> dict[str, Any]:
        """Everything but the grid's own axes: what makes two trials of one (variant, seed) differ.

        The divergence guard is left out too: it stops a trial, it never changes a finished one, so
        changing it keeps the trained trials (a diverged one resumes from its last checkpoint).
        """
        return self.model_dump(mode="json", exclude={"backbones", "variants", "seeds", "divergence_factor"},
                               exclude_none=True)

    def optimizer_for(self, task: str, backbone: str) -> OptimizerSpec:
        """The optimizer a backbone trains with: `optimizer` for nnMamba (the paper's recipe) and for
        everyone under `recipe: shared`; otherwise the backbone's override, else its published recipe
        (nnmamba.backbones), else `optimizer`."""
        if self.recipe == "shared" or backbone == NNMAMBA:
            return self.optimizer
        if backbone in self.backbone_optimizers:
            return self.backbone_optimizers[backbone]
        recipe = get_backbone(task, backbone).recipe
        if recipe is None:
            return self.optimizer
        return OptimizerSpec(name=recipe.optimizer, lr=recipe.lr, weight_decay=recipe.weight_decay,
                             momentum=recipe.momentum, nesterov=recipe.nesterov, schedule=recipe.schedule)

    def loss_for(self, task: str, backbone: str) -> str | None:
        """The segmentation loss a backbone trains with (nnmamba.losses.SEGMENTATION_LOSSES), chosen as
        `optimizer_for` chooses: Dice + CE for nnMamba and under `recipe: shared`. None for the other
        tasks, which have one loss each."""
        if task != "segmentation":
            return None
        if self.recipe == "shared" or backbone == NNMAMBA:
            return "dice_ce"
        if backbone in self.backbone_losses:
            return self.backbone_losses[backbone]
        recipe = get_backbone(task, backbone).recipe
        return recipe.loss if recipe is not None else "dice_ce"

    def grid(self) -> list[tuple[str, str]]:
        """(backbone, row) of every model the study trains per seed: nnMamba's variants (the row is
        the variant), then each competitor (the row is its name)."""
        rows = [(NNMAMBA, variant) for variant in self.variants] if NNMAMBA in self.backbones else []
        return rows + [(backbone, backbone) for backbone in self.backbones if backbone != NNMAMBA]


class EvaluateSpec(Spec):
    overlap: float
    nsd_tolerance_mm: float
    mirror_axes: tuple[int, ...]
    resources: dict[str, float]                 # per Ray task: {CPU: n, GPU: m}
    regions: dict[str, tuple[int, ...]] | None = None   # None: one region per foreground class
    ensemble_folds: bool = False                # k-fold: also score each (row, seed)'s folds as one model


class RaySpec(Spec):
    preset: str | None = None
    address: str | None = None
    storage_path: str
    max_failures: int
    num_workers: int
    use_gpu: bool
    resources_per_worker: dict[str, float]
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"]
    max_concurrent_trials: int
    reuse_actors: bool = False
    env_vars: dict[str, str] = {}


class MlflowSpec(Spec):
    tracking_uri: str
    register_models: bool


class ReportSpec(Spec):
    overlay_cases: int
    ablation: dict[str, str]                    # task -> the study behind its Table 5 columns
    paper_numbers: str | None = None            # YAML of the paper's published numbers: rows marked "(paper)"


class SyntheticSpec(Spec):
    """One synthetic dataset: its layout and the options of that layout's generator."""

    model_config = ConfigDict(frozen=True, extra="allow")
    layout: str

    def options(self) -> dict[str, Any]:
        return {k: tuple(v) if isinstance(v, list) else v for k, v in (self.model_extra or {}).items()}


class StudySpec(Spec):
    """Everything one study's stages need: its own sections merged over the shared ones."""

    name: str
    task: str
    init: str
    dataset: DatasetSpec
    prepare: PrepareSpec
    plan: PlanSettings
    split: SplitSpec
    model: ModelSpec
    train: TrainSpec
    evaluate: EvaluateSpec
    ray: RaySpec
    mlflow: MlflowSpec

    def identity(self) -> dict[str, Any]:
        """The settings a trained model depends on, apart from its grid point and the plan."""
        sections = self.model_dump(mode="json", include={"dataset", "prepare", "split"})
        return {**sections, "model": self.model.kwargs(), "train": self.train.grid_free()}


class TrialSpec(Spec):
    """One point of a study's Tune grid, with everything its Ray Train workers need.

    Built once, by the train stage, for every (variant, seed); `digest` is the study
    configuration's, so a re-run with the same configuration resumes the same Ray Train run.
    """

    study: StudySpec
    backbone: str
    variant: str                                # the table row: nnMamba's variant, or the backbone's name
    seed: int
    fold: int | None = None                     # k-fold studies: the fold that validates this trial
    optimizer: OptimizerSpec                    # the backbone's recipe (TrainSpec.optimizer_for)
    loss: str | None = None                     # segmentation: the backbone's loss (TrainSpec.loss_for)
    digest: str
    storage_path: str                           # Ray Train checkpoints (a path or s3://...)
    dataset_dir: str
    train_cases: tuple[str, ...]
    val_cases: tuple[str, ...]
    init_dir: str | None                        # the upstream model a transfer study starts from
    arch: dict[str, Any]                        # nnmamba.checkpoint's architecture record
    prediction: dict[str, Any] | None           # what `nnmamba predict` needs besides the weights

    @property
    def name(self) -> str:
        return trial_name(self.variant, self.seed, self.fold)

    @property
    def run_name(self) -> str:
        """The Ray Train run: study, trial and configuration digest."""
        return f"{self.study.name}-{self.name}-{self.digest}"

    def __repr__(self) -> str:  # Tune names trials and prints its progress table with this
        return f"{self.study.name}-{self.name}"

    __str__ = __repr__


class Params(Spec):
    profile: str
    synthetic: dict[str, SyntheticSpec]
    studies: dict[str, StudySpec]
    report: ReportSpec
    mlflow: MlflowSpec

    def study(self, name: str) -> StudySpec:
        if name not in self.studies:
            raise ParamsError(f"study {name!r} is not defined in params.yaml{_did_you_mean(name, self.studies)}")
        return self.studies[name]


TOP_LEVEL = ("profile", "synthetic", "studies", *STUDY_SECTIONS, "plan", "ray", "mlflow", "report", "profiles")
STUDY_KEYS = ("task", "init", "dataset", *STUDY_SECTIONS)


def deep_merge(base: dict, overlay: dict) -> dict:
    """Recursively merge `overlay` into a copy of `base`; lists and scalars are replaced."""
    merged = copy.deepcopy(base)
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def load_params(path: Path = PARAMS_FILE) -> Params:
    """The whole params file with its active profile applied, every study validated."""
    raw = yaml.safe_load(path.read_text()) or {}
    _check_keys(raw, TOP_LEVEL, (), path)
    profile = raw.get("profile", "default")
    profiles = raw.get("profiles", {})
    if profile != "default" and profile not in profiles:
        raise ParamsError(f"{path}: profile {profile!r} is not defined under 'profiles'"
                          f"{_did_you_mean(profile, profiles)} (known: {sorted(profiles)})")
    overlay = profiles.get(profile, {}) if profile != "default" else {}
    _check_keys(overlay, TOP_LEVEL, ("profiles", profile), path)
    merged = deep_merge(raw, overlay)
    origins = _Origins(raw, ("profiles", profile), overlay)
    ray_section, ray_origins = apply_preset(merged.get("ray", {}), path)
    shared = {"plan": merged.get("plan", {}), "ray": ray_section, "mlflow": merged.get("mlflow", {})}
    studies = {}
    for name, entry in (merged.get("studies") or {}).items():
        _check_keys(entry, STUDY_KEYS, origins.where(("studies", name)), path)
        study = {"name": name, **{k: entry.get(k) for k in ("task", "init", "dataset")}, **shared}
        for section in STUDY_SECTIONS:
            study[section] = deep_merge(merged.get(section, {}), entry.get(section, {}))
        study = {k: v for k, v in study.items() if v is not None}
        studies[name] = _validate(StudySpec, study, lambda loc, n=name: origins.study(n, loc, ray_origins), path)
        _check_study(studies[name], origins.where(("studies", name)), path)
    return Params(
        profile=profile,
        synthetic={name: _validate(SyntheticSpec, spec, lambda loc, n=name: origins.where(("synthetic", n, *loc)), path)
                   for name, spec in (merged.get("synthetic") or {}).items()},
        studies=studies,
        report=_validate(ReportSpec, merged.get("report", {}), lambda loc: origins.where(("report", *loc)), path),
        mlflow=_validate(MlflowSpec, merged.get("mlflow", {}), lambda loc: origins.where(("mlflow", *loc)), path),
    )


def apply_preset(ray_section: dict, path: Path) -> tuple[dict, Path | None]:
    """The `ray` section filled from its named scaling preset (keys set in params.yaml win), and the preset file."""
    name = ray_section.get("preset")
    if name is None:
        return ray_section, None
    preset = PRESETS_DIR / f"{name}.yaml"
    if not preset.is_file():
        known = sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))
        raise ParamsError(f"{path}: ray.preset {name!r} has no file {preset}{_did_you_mean(name, known)} "
                          f"(known presets: {known})")
    return deep_merge(yaml.safe_load(preset.read_text()) or {}, ray_section), preset


def _check_study(study: StudySpec, where: tuple, path: Path) -> None:
    """What pydantic's types cannot say: the task and the backbones are ones the pipeline knows."""
    if study.task not in TASK_NAMES:
        raise ParamsError(f"{path}: {_dotted((*where, 'task'))}: unknown task {study.task!r}"
                          f"{_did_you_mean(study.task, TASK_NAMES)} (known: {sorted(TASK_NAMES)})")
    known = available_backbones(study.task)
    train = study.train
    for backbone in (*train.backbones, *train.backbone_options, *train.backbone_optimizers, *train.backbone_losses):
        if backbone in UNAVAILABLE:
            raise ParamsError(f"{path}: study {study.name}: train.backbones: {backbone!r} is not available: "
                              f"{UNAVAILABLE[backbone]}")
        if backbone not in known:
            raise ParamsError(f"{path}: study {study.name}: train.backbones: unknown {study.task} backbone "
                              f"{backbone!r}{_did_you_mean(backbone, known)} (known: {', '.join(known)})")


class _Origins:
    """Where in the file a key of the merged configuration was written (profile overlay first)."""

    def __init__(self, raw: dict, profile_prefix: tuple, overlay: dict):
        self.sources = [(profile_prefix, overlay), ((), raw)]

    def _written(self, loc: tuple) -> tuple | None:
        """The longest written prefix of `loc` (so a bad list item names its list), with the rest appended."""
        for length in range(len(loc), 0, -1):
            for prefix, data in self.sources:
                if _contains(data, loc[:length]):
                    return (*prefix, *loc)
        return None

    def where(self, loc: tuple) -> tuple:
        """Where `loc` was written or, for a key nobody wrote (a missing one), `loc` itself."""
        return self._written(loc) or loc

    def study(self, name: str, loc: tuple, ray_preset: Path | None) -> tuple:
        """A study's key: its own override, else the shared section, else the ray preset file."""
        section, rest = loc[0], loc[1:]
        if section in STUDY_SECTIONS:
            own = ("studies", name, *loc)
            if any(_contains(data, own) for _, data in self.sources):
                return self.where(own)
            return self.where(loc)
        if section in ("plan", "ray", "mlflow"):
            if section == "ray" and ray_preset is not None and self._written(loc) is None:
                return (f"{ray_preset.name}:", *rest)
            return self.where(loc)
        return self.where(("studies", name, *loc))


def _contains(data: Any, loc: tuple) -> bool:
    for key in loc:
        if not isinstance(data, dict) or key not in data:
            return False
        data = data[key]
    return True


def _validate(model: type[Spec], data: dict, origin, path: Path):
    """`model` validated from `data`; a ParamsError naming every bad key where it was written."""
    try:
        return model.model_validate(data)
    except ValidationError as error:
        problems = [_describe(model, issue, origin) for issue in error.errors()]
        raise ParamsError(f"{path}: " + "; ".join(dict.fromkeys(problems))) from None


def _describe(model: type, issue: dict, origin) -> str:
    loc = tuple(part for part in issue["loc"] if not isinstance(part, int) or part >= 0)
    # pydantic reports which member of a union failed (`int`, `literal['auto']`): not a key of the file.
    keys = tuple(part for part in loc if not _is_union_tag(part))
    where = _dotted(origin(keys))
    if issue["type"] in ("extra_forbidden", "unexpected_keyword_argument"):
        known = _known_keys(model, keys[:-1])
        return f"{where}: unknown key{_did_you_mean(str(keys[-1]), known)} (known: {', '.join(sorted(known))})"
    if issue["type"] in ("missing", "missing_keyword_argument", "missing_argument") and not isinstance(keys[-1], int):
        return f"{where}: missing key"
    return f"{where}: {issue['msg']} (got {issue.get('input')!r})"


def _is_union_tag(part: Any) -> bool:
    return isinstance(part, str) and (part in ("int", "float", "str", "bool") or "[" in part or part.startswith("tuple"))


def _known_keys(model: type, loc: tuple) -> list[str]:
    """The keys a section of the schema allows, found by walking `loc` through the spec types."""
    node: Any = model
    for key in loc:
        node = _field_type(node, key)
    return _keys_of(node)


def _keys_of(node: Any) -> list[str]:
    node = _section_type(node)
    if isinstance(node, type) and issubclass(node, BaseModel):
        return list(node.model_fields)
    if is_dataclass(node):
        return [f.name for f in dataclass_fields(node)]
    return []


def _field_type(node: Any, key: Any) -> Any:
    node = _section_type(node)
    if isinstance(node, type) and issubclass(node, BaseModel):
        return node.model_fields[key].annotation if key in node.model_fields else None
    if is_dataclass(node):
        return typing.get_type_hints(node).get(key)
    if typing.get_origin(node) is dict:
        return typing.get_args(node)[1]
    return None


def _section_type(node: Any) -> Any:
    """The section class or dict type inside an Optional/Union annotation."""
    members = typing.get_args(node) if typing.get_origin(node) in (typing.Union, types.UnionType) else (node,)
    for member in members:
        if (isinstance(member, type) and (issubclass(member, BaseModel) or is_dataclass(member))) \
                or typing.get_origin(member) is dict:
            return member
    return node


def _check_keys(section: Any, allowed: tuple[str, ...], where: tuple, path: Path) -> None:
    if not isinstance(section, dict):
        raise ParamsError(f"{path}: {_dotted(where) or 'the file'}: expected a mapping, got {section!r}")
    for key in section:
        if key not in allowed:
            raise ParamsError(f"{path}: {_dotted((*where, key))}: unknown key{_did_you_mean(str(key), allowed)} "
                              f"(known: {', '.join(allowed)})")


def _did_you_mean(word: str, candidates) -> str:
    close = difflib.get_close_matches(word, [str(c) for c in candidates], n=3, cutoff=0.6)
    return f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""


def _dotted(loc: tuple) -> str:
    return ".".join(str(part) for part in loc).replace(":.", ": ")
