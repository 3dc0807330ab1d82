"""Connecting the stages to Ray: the local machine by default, a cluster when one is named."""

from __future__ import annotations

import os

import ray

# Variables every Ray process must see; NVLink multicast stays off on shared GPU hosts.
WORKER_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def connect_ray(config: dict) -> None:
    """Join the cluster in RAY_ADDRESS (or `ray.address` in params), else start a local Ray.

    Jobs submitted with `ray job submit` find RAY_ADDRESS set by Ray itself, so the same stage
    code runs on a laptop and on a cluster.
    """
    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS") or config["ray"].get("address")
    env = dict(WORKER_ENV)
    if address and "://" not in address and address not in ("auto", "local"):
        # Ray Train's placement-group cleaner looks actors up by the cluster address; without one it
        # picks the most recently started Ray on the host, and on a host running several clusters
        # (CI, shared machines) it then tears down this job's live trials.
        env["RAY_ADDRESS"] = address
    ray.init(address=address, runtime_env={"env_vars": env})
