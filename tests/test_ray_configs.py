"""ray_configs/: launcher YAMLs against Ray's autoscaler schema, the KubeRay RayJob, the job
runtime_env, and the scaling presets (what they fill in, what params.yaml overrides)."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
import ray
import ray.autoscaler
import ray.train
import yaml
from ray.runtime_env import RuntimeEnv

from pipelines.cluster import SUBMITTED_JOB_CONFIG_ENV, WORKER_ENV, driver_runtime_env
from pipelines.params import PRESETS_DIR, MlflowSpec, ParamsError, load_params
from pipelines.tracking import tracking_uri
from pipelines.train import trial_specs
from pipelines.workspace import REPO_ROOT, resolve

CONFIGS = REPO_ROOT / "ray_configs"
LAUNCHERS = ("cluster-aws.yaml", "cluster-onprem.yaml")
PRESETS = ("cpu-debug", "gpu-1", "gpu-4", "gpu-2x8")
SCHEMA = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())

# The NVLink-multicast switches every Ray worker on the shared GPU hosts must see (../shared/gpu/README.md).
NVLINK_MULTICAST_OFF = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}

def load(name: str) -> dict:
    return yaml.safe_load((CONFIGS / name).read_text())


def preset(name: str) -> dict:
    return yaml.safe_load((PRESETS_DIR / f"{name}.yaml").read_text())


def start_commands(config: dict) -> list[str]:
    return [c for c in config["head_start_ray_commands"] + config["worker_start_ray_commands"] if "ray start" in c]


@pytest.mark.parametrize("name", LAUNCHERS)
def test_launcher_config_validates_against_ray_schema(name):
    config = load(name)
    jsonschema.validate(config, SCHEMA)
    broken = {**config, "max_workers": "two"}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, SCHEMA)


@pytest.mark.parametrize("name", LAUNCHERS)
def test_launcher_nodes_join_with_token_auth_and_start_mlflow(name):
    config = load(name)
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    assert start_commands(config) and all("RAY_AUTH_MODE=token" in c for c in start_commands(config))
    head = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head
    assert "mlflow server --host 0.0.0.0" in head and "--artifacts-destination" in head
    assert any('nnmamba[pipeline]' in c for c in config["setup_commands"])


def test_aws_cluster_hosts_the_two_node_preset():
    config = load("cluster-aws.yaml")
    assert config["head_node_type"] in config["available_node_types"]
    assert config["docker"]["image"].startswith(f"rayproject/ray:{ray.__version__}-")
    gpu_nodes = [t for t in config["available_node_types"].values() if t["resources"].get("GPU")]
    assert sum(t["min_workers"] for t in gpu_nodes) == 2
    assert config["max_workers"] == sum(t.get("max_workers", 0) for t in config["available_node_types"].values())
    need = preset("gpu-2x8")
    per_worker = need["resources_per_worker"]
    for node in gpu_nodes:
        workers_here = need["num_workers"] // 2
        assert node["resources"]["GPU"] >= workers_here * per_worker["GPU"]
        assert node["resources"]["CPU"] >= workers_here * per_worker["CPU"]


def test_onprem_cluster_lists_one_worker_per_max_worker():
    config = load("cluster-onprem.yaml")
    assert config["provider"]["type"] == "local"
    assert len(config["provider"]["worker_ips"]) == config["max_workers"] == 1


def test_kuberay_rayjob_matches_the_pinned_ray_and_sets_worker_env():
    job = load("kuberay-rayjob.yaml")
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    assert "python -m pipelines.train brats2023" in job["spec"]["entrypoint"]
    cluster = job["spec"]["rayClusterSpec"]
    assert cluster["rayVersion"] == ray.__version__
    assert cluster["authOptions"] == {"mode": "token"}
    pods = [cluster["headGroupSpec"]] + cluster["workerGroupSpecs"]
    for pod in pods:
        for container in pod["template"]["spec"]["containers"]:
            assert container["image"].startswith(f"rayproject/ray:{ray.__version__}-")
    runtime_env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])
    RuntimeEnv(**runtime_env)
    assert NVLINK_MULTICAST_OFF.items() <= runtime_env["env_vars"].items()
    gpus = sum(int(g["replicas"]) * int(g["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
               for g in cluster["workerGroupSpecs"])
    need = preset("gpu-2x8")
    assert gpus == need["num_workers"] * need["resources_per_worker"]["GPU"]


def test_job_runtime_env_is_valid_and_keeps_nvlink_multicast_off():
    runtime_env = load("runtime_env.yaml")
    RuntimeEnv(**runtime_env)
    assert NVLINK_MULTICAST_OFF.items() <= runtime_env["env_vars"].items()
    assert NVLINK_MULTICAST_OFF.items() <= WORKER_ENV.items()


# Workers per trial, GPUs per worker, placement and trials at once of each preset, as the README's table states.
PRESET_SCALE = {"cpu-debug": (1, 0, "PACK", 2), "gpu-1": (1, 1, "PACK", 1), "gpu-4": (4, 1, "PACK", 1),
                "gpu-2x8": (16, 1, "SPREAD", 1)}


@pytest.mark.parametrize("name", PRESETS)
def test_preset_scales_as_documented_and_builds_a_scaling_config(name):
    values = preset(name)
    ray.train.ScalingConfig(
        num_workers=values["num_workers"], use_gpu=values["use_gpu"],
        resources_per_worker=values["resources_per_worker"], placement_strategy=values["placement_strategy"],
    )
    gpus = values["resources_per_worker"].get("GPU", 0)
    assert (values["num_workers"], gpus, values["placement_strategy"], values["max_concurrent_trials"]) == \
        PRESET_SCALE[name]
    assert values["use_gpu"] == (gpus > 0)


def test_presets_directory_holds_exactly_the_documented_presets():
    assert sorted(p.stem for p in PRESETS_DIR.glob("*.yaml")) == sorted(PRESETS)


def write_params(tmp_path: Path, ray_section: dict) -> Path:
    params = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    # the keys no preset sets (where checkpoints go, how often a trial may fail) stay as written
    params["ray"] = {key: params["ray"][key] for key in ("storage_path", "max_failures")} | ray_section
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def test_preset_fills_the_ray_section_and_params_yaml_wins(tmp_path):
    ray_section = load_params(write_params(tmp_path, {"preset": "gpu-4", "max_failures": 2})).study("brats2023").ray
    assert ray_section.num_workers == 4 and ray_section.use_gpu is True
    assert ray_section.placement_strategy == "PACK" and ray_section.max_failures == 2
    overridden = load_params(write_params(tmp_path, {"preset": "gpu-4", "num_workers": 2,
                                                     "resources_per_worker": {"CPU": 4}})).study("brats2023").ray
    assert overridden.num_workers == 2
    assert overridden.resources_per_worker == {"CPU": 4, "GPU": 1}
    assert overridden.max_concurrent_trials == preset("gpu-4")["max_concurrent_trials"]


def test_unknown_preset_is_a_clear_error(tmp_path):
    with pytest.raises(ParamsError, match=r"ray.preset 'gpu-3'.*known presets: \['cpu-debug'"):
        load_params(write_params(tmp_path, {"preset": "gpu-3"}))


def test_the_default_profile_runs_the_cpu_debug_preset():
    ray_section = load_params().study("brats2023").ray
    assert ray_section.preset == "cpu-debug" and ray_section.use_gpu is False
    assert ray_section.env_vars["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] == "0"


def test_workspace_env_moves_relative_paths_and_the_sqlite_store(tmp_path, monkeypatch):
    monkeypatch.setenv("NNMAMBA_WORKSPACE", str(tmp_path))
    assert resolve("data/preprocessed") == tmp_path / "data/preprocessed"
    assert resolve("/abs/path") == Path("/abs/path")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking_uri(MlflowSpec(tracking_uri="sqlite:///mlflow.db", register_models=False)) == \
        f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.delenv("NNMAMBA_WORKSPACE")
    assert resolve("data") == REPO_ROOT.resolve() / "data"


def test_driver_adds_only_the_worker_variables_a_submitted_job_lacks(monkeypatch):
    config = load_params().study("brats2023").ray.model_copy(
        update={"env_vars": {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}})
    monkeypatch.delenv(SUBMITTED_JOB_CONFIG_ENV, raising=False)
    assert driver_runtime_env(config) == {"env_vars": {**WORKER_ENV, "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}}
    job = {"runtime_env": {"env_vars": {"NCCL_NVLS_ENABLE": "1", "OTHER": "x"}, "working_dir": "gcs://pkg.zip"}}
    monkeypatch.setenv(SUBMITTED_JOB_CONFIG_ENV, json.dumps(job))
    env = driver_runtime_env(config)["env_vars"]
    assert "NCCL_NVLS_ENABLE" not in env and "OTHER" not in env
    assert env["NVSHMEM_DISABLE_NVLS"] == "1" and env["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] == "0"
    everything = {"runtime_env": {"env_vars": {**WORKER_ENV, "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "1"}}}
    monkeypatch.setenv(SUBMITTED_JOB_CONFIG_ENV, json.dumps(everything))
    assert driver_runtime_env(config) is None


def test_a_workspace_without_prepared_data_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("NNMAMBA_WORKSPACE", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=rf"{tmp_path}/data/preprocessed/brats2023/dataset.json is missing.*"
                                                r"dvc repro prepare@brats2023.*NNMAMBA_WORKSPACE"):
        trial_specs(load_params().study("brats2023"), "digest", str(tmp_path))
