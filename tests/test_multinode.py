"""Two Ray nodes on this machine (a head and a worker raylet): one trial's DDP workers spread over
both nodes train with gloo, restore from the checkpoint on the shared storage path, and match
the same run with both workers on one node.

The trial is the pipeline's own (`trial_specs` -> `build_trainer`, whose
workers run `pipelines.train_worker.train_loop`) on the tiny study the real stages prepared.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import ray
import ray.cloudpickle
import ray.train
from ray.cluster_utils import Cluster
from ray.util.state import list_actors

from pipelines.cluster import connect_ray
from pipelines.params import StudySpec, deep_merge, load_params
from pipelines.resolve import resolve_study
from pipelines.train import trial_specs
from pipelines.trial import build_trainer
from tests.conftest import free_port

pytestmark = pytest.mark.slow

METRICS = ("train_loss", "val_dice_mean")
# The Train controller unpickles ReportLog; it cannot import this test module, so ship it by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


class ReportLog(ray.train.UserCallback):
    """Append every `ray.train.report` (all workers' metrics, the checkpoint's path) to a JSON-lines file.

    It runs in the Train controller, a process on this machine, so the test reads the file afterwards.
    """

    def __init__(self, path: Path):
        self.path = str(path)

    def after_report(self, run_context, metrics, checkpoint):
        with open(self.path, "a") as log:
            log.write(json.dumps({"metrics": metrics, "checkpoint": checkpoint.path if checkpoint else None}) + "\n")


@pytest.fixture(scope="module")
def two_nodes(cluster_project, monkeypatch_module):
    """A head node and a worker node, two CPUs each, joined by this process through connect_ray."""
    dashboard_port = free_port()
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 2, "include_dashboard": True, "dashboard_host": "127.0.0.1", "dashboard_port": dashboard_port})
    cluster.add_node(num_cpus=2)
    cluster.wait_for_nodes()
    monkeypatch_module.delenv("RAY_ADDRESS", raising=False)
    monkeypatch_module.setenv("NNMAMBA_WORKSPACE", str(cluster_project["workspace"]))
    study = load_params(cluster_project["code"] / "params.yaml").study("brats2023")
    connect_ray(study.ray.model_copy(update={"address": cluster.address}))
    yield study, f"http://127.0.0.1:{dashboard_port}"
    ray.shutdown()
    cluster.shutdown()


def study_with(study: StudySpec, overrides: dict) -> StudySpec:
    """The study with params.yaml-shaped section overrides merged in (and validated again)."""
    return StudySpec.model_validate(deep_merge(study.model_dump(), overrides))


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def train_run(two_nodes: tuple, placement: str, epochs: int, storage: Path, log: Path) -> tuple[dict, list[str]]:
    """Fit the tiny study's trial with two workers; its final metrics and the node of each new worker."""
    study, dashboard = two_nodes
    workers = [("class_name", "=", "RayTrainWorker")]
    overrides = {"ray": {"num_workers": 2, "placement_strategy": placement, "resources_per_worker": {"CPU": 1}},
                 "train": {"epochs": epochs}}
    study = resolve_study(study_with(study, overrides))
    trial = next(t for t in trial_specs(study, placement.lower(), str(storage)) if (t.variant, t.seed) == ("mic", 0))
    before = {a.actor_id for a in list_actors(address=dashboard, filters=workers, limit=1000)}
    result = build_trainer(trial, [ReportLog(log)]).fit()
    new = [a for a in list_actors(address=dashboard, filters=workers, limit=1000) if a.actor_id not in before]
    return result.metrics, [a.node_id for a in new]


def reports(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(two_nodes, tmp_path_factory):
    """PACK and SPREAD runs: one epoch, then the same run name to two epochs (restored from storage)."""
    storage = tmp_path_factory.mktemp("shared_storage")
    logs = tmp_path_factory.mktemp("report_logs")
    out = {}
    for placement in ("PACK", "SPREAD"):
        first, first_nodes = train_run(two_nodes, placement, 1, storage, logs / f"{placement}-1.jsonl")
        second, second_nodes = train_run(two_nodes, placement, 2, storage, logs / f"{placement}-2.jsonl")
        out[placement] = {"first": first, "second": second, "nodes": [first_nodes, second_nodes],
                          "logs": [reports(logs / f"{placement}-1.jsonl"), reports(logs / f"{placement}-2.jsonl")]}
    return out, storage


def test_spread_places_the_workers_on_both_nodes_and_pack_on_one(runs):
    out, _ = runs
    for nodes in out["SPREAD"]["nodes"]:
        assert len(nodes) == 2 and nodes[0] != nodes[1]
    for nodes in out["PACK"]["nodes"]:
        assert len(nodes) == 2 and nodes[0] == nodes[1]


def test_second_fit_restores_the_checkpoint_on_shared_storage(runs):
    out, storage = runs
    for placement in ("PACK", "SPREAD"):
        first_log, second_log = out[placement]["logs"]
        assert [r["metrics"][0]["epoch"] for r in first_log] == [1]
        # Restored at epoch 1 from the checkpoint the first fit wrote, it trains epoch 2 only.
        assert [r["metrics"][0]["epoch"] for r in second_log] == [2]
        assert Path(first_log[0]["checkpoint"]).parent.parent == storage
        assert (Path(second_log[0]["checkpoint"]) / "state.pt").is_file()


def test_both_workers_report_the_same_all_reduced_loss(runs):
    out, _ = runs
    for placement in ("PACK", "SPREAD"):
        for log in out[placement]["logs"]:
            for report in log:
                assert len(report["metrics"]) == 2
                assert report["metrics"][0]["train_loss"] == report["metrics"][1]["train_loss"]


def test_two_node_run_matches_the_single_node_run(runs):
    out, _ = runs
    for stage in ("first", "second"):
        for key in METRICS:
            assert out["SPREAD"][stage][key] == pytest.approx(out["PACK"][stage][key], rel=1e-4, abs=1e-5)
    assert out["SPREAD"]["second"]["train_loss"] != out["SPREAD"]["first"]["train_loss"]
