"""Security defaults (#16 item 7): the local Ray a stage starts listens on 127.0.0.1 only, and no
checkpoint is unpickled beyond its weights.

The Ray is started in a fresh process by `pipelines.cluster.connect_ray`, as every stage does, with
no RAY_ADDRESS; its listening sockets (GCS, raylet, dashboard, agents, workers) are read from the
operating system. On Linux Ray listens on every interface unless told it runs on one machine.
"""

from __future__ import annotations

import ast
import json
import os
import pickle
import subprocess
from pathlib import Path

import pytest
import torch

from nnmamba.checkpoint import WEIGHTS_FILE, load_bundle, save_bundle
from nnmamba.models import build_model
from pipelines import SINGLE_MACHINE_ENV
from tests.conftest import BIN, REPO
from tests.listening import is_loopback

SOURCES = ("nnmamba", "pipelines", "benchmarks")

# Started like a stage (`pipelines` imported before Ray); waits until the node's agents listen too
# (they start after ray.init returns), then prints what listens where.
PROBE = """
import json, os, time
from pipelines.cluster import connect_ray
from pipelines.params import load_params
import ray
from tests.listening import listening_sockets

connect_ray(load_params().study("brats2023").ray)
wanted = {"gcs_server", "raylet", "ray::DashboardAgent", "ray::RuntimeEnvAgent"}
deadline = time.monotonic() + 60
while not wanted <= {name for name, _, _ in listening_sockets(os.getpid())} and time.monotonic() < deadline:
    time.sleep(0.5)
time.sleep(1)
probe = {"sockets": listening_sockets(os.getpid()), "node_ip": ray.nodes()[0]["NodeManagerAddress"]}
print("PROBE=" + json.dumps(probe))
ray.shutdown()
"""


@pytest.mark.slow
def test_the_local_ray_of_a_stage_listens_on_loopback_only():
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", SINGLE_MACHINE_ENV)}
    out = subprocess.run([BIN / "python", "-c", PROBE], cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    probe = json.loads(out.stdout.split("PROBE=")[1])
    sockets = probe["sockets"]
    names = {name for name, _, _ in sockets}
    assert {"gcs_server", "raylet", "ray::DashboardAgent", "ray::RuntimeEnvAgent"} <= names, sockets
    exposed = [s for s in sockets if not is_loopback(s[1])]
    assert not exposed, f"listening beyond 127.0.0.1: {exposed}"
    assert probe["node_ip"] == "127.0.0.1"
    assert "using a private local Ray (GCS 127.0.0.1:" in out.stdout and "warning" not in out.stdout


def torch_loads(file: Path) -> list[ast.Call]:
    """Every `torch.load(...)` / `torch.serialization.load(...)` call in a source file."""
    def is_torch_load(func: ast.expr) -> bool:
        return (isinstance(func, ast.Attribute) and func.attr == "load"
                and ast.unparse(func.value) in ("torch", "torch.serialization"))
    return [node for node in ast.walk(ast.parse(file.read_text(), str(file)))
            if isinstance(node, ast.Call) and is_torch_load(node.func)]


def test_every_torch_load_in_the_source_is_weights_only():
    calls = {f"{file.relative_to(REPO)}:{call.lineno}": call
             for source in SOURCES for file in sorted((REPO / source).rglob("*.py")) for call in torch_loads(file)}
    assert calls, "no torch.load found: the scan is looking in the wrong place"
    unsafe = [where for where, call in calls.items()
              if not any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                         for k in call.keywords)]
    assert not unsafe, f"torch.load without weights_only=True: {unsafe}"


def plant(marker: str) -> None:
    """What the booby-trapped checkpoint runs when unpickled: it leaves a file behind."""
    Path(marker).touch()


class Payload:
    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return plant, (self.marker,)


def test_a_bundle_whose_weights_pickle_code_is_refused_without_running_it(tmp_path):
    model = build_model("segmentation", "baseline", 1, 2, base_channels=4, blocks_per_stage=1)
    arch = {"task": "segmentation", "backbone": "nnmamba", "variant": "baseline", "in_channels": 1,
            "out_channels": 2, "input_shape": [16, 16, 16], "kwargs": {"base_channels": 4, "blocks_per_stage": 1}}
    bundle, marker = tmp_path / "bundle", tmp_path / "planted"
    save_bundle(bundle, arch, model.state_dict())
    load_bundle(bundle)   # the honest bundle loads
    torch.save({**model.state_dict(), "extra": Payload(marker)}, bundle / WEIGHTS_FILE)
    torch.load(bundle / WEIGHTS_FILE, weights_only=False)
    assert marker.exists(), "the payload does not run when unpickled: the test proves nothing"
    marker.unlink()

    with pytest.raises(pickle.UnpicklingError) as refused:
        load_bundle(bundle)
    message = str(refused.value)
    assert message.startswith(f"{bundle / WEIGHTS_FILE}: refused to load") and "\n" not in message
    assert "test_security_defaults.plant" in message
    assert not marker.exists()
