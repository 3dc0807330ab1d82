"""Connecting the stages to Ray: the local machine by default, a cluster when one is named."""

from __future__ import annotations

import ipaddress
import json
import os

import ray

from pipelines import SINGLE_MACHINE_ENV
from pipelines.params import RaySpec

# Variables every Ray process must see; NVLink multicast stays off on shared GPU hosts.
WORKER_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}

# Ray's job supervisor hands a submitted job's runtime_env to its driver in this variable (a Ray
# internal name, read-only here): ray.init refuses a runtime_env that repeats one of its env vars.
SUBMITTED_JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"


def worker_env(settings: RaySpec) -> dict[str, str]:
    """Environment of every Ray worker: WORKER_ENV plus the scaling preset's `ray.env_vars`."""
    return {**WORKER_ENV, **settings.env_vars}


def submitted_job_env() -> dict[str, str]:
    """The env_vars of the runtime_env this driver was submitted with (`ray job submit`), else {}."""
    job_config = json.loads(os.environ.get(SUBMITTED_JOB_CONFIG_ENV) or "{}")
    return (job_config.get("runtime_env") or {}).get("env_vars") or {}


def driver_runtime_env(settings: RaySpec) -> dict | None:
    """The runtime_env this driver passes to ray.init: the worker variables a submitted job lacks.

    Variables the submitted job's runtime_env already sets keep the job's value (Ray refuses a
    driver runtime_env that repeats them); the others are added to it.
    """
    job_env = submitted_job_env()
    env = {key: value for key, value in worker_env(settings).items() if key not in job_env}
    return {"env_vars": env} if env else None


def connect_ray(settings: RaySpec) -> None:
    """Join the cluster in RAY_ADDRESS (or `ray.address` in params), else start a private local Ray.

    Jobs submitted with `ray job submit` find RAY_ADDRESS set by Ray itself, so the same stage
    code runs on a laptop and on a cluster. Without an address, plain `ray.init()` would join any
    cluster that `ray start` left running on the host; "local" never does, and its processes listen
    on 127.0.0.1 only (see `pipelines/__init__.py`). The log says which Ray, and where it listens.
    """
    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS") or settings.address or "local"
    runtime_env = driver_runtime_env(settings)
    if address and "://" not in address and address not in ("auto", "local"):
        # Ray Train's placement-group cleaner looks actors up by the cluster address; without one it
        # picks the most recently started Ray on the host, and on a host running several clusters
        # (CI, shared machines) it then tears down this job's live trials.
        runtime_env = {"env_vars": {**(runtime_env or {}).get("env_vars", {}), "RAY_ADDRESS": address}}
    local = {"dashboard_host": "127.0.0.1"} if address == "local" else {}
    try:
        ray.init(address=address, runtime_env=runtime_env, **local)
    except ConnectionError as error:
        if address != "local" and os.environ.get(SINGLE_MACHINE_ENV) == "0":
            raise ConnectionError(f"{error}: a stage started without RAY_ADDRESS keeps Ray on 127.0.0.1 "
                                  f"({SINGLE_MACHINE_ENV}=0) and reaches only a cluster there; export "
                                  f"RAY_ADDRESS={address} to join this one") from error
        raise
    log_connection(address)


def log_connection(address: str) -> None:
    """One line naming the Ray in use, its GCS address and resources; a warning when a local Ray is
    reachable from the network."""
    gcs = ray.get_runtime_context().gcs_address
    where = "a private local Ray" if address == "local" else f"the cluster at {address}"
    resources = {k: v for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU")}
    print(f"ray: using {where} (GCS {gcs}, {resources})", flush=True)
    if address == "local" and not ipaddress.ip_address(gcs.rsplit(":", 1)[0].strip("[]")).is_loopback:
        print(f"ray: warning: the local Ray listens on every interface, not only 127.0.0.1 (Ray was imported "
              f"before `pipelines`, or {SINGLE_MACHINE_ENV}=1)", flush=True)
