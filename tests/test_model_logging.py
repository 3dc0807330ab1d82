"""The logged MLflow model: schema and requirements as given (nothing inferred), and it loads back
to the same network."""

from __future__ import annotations

from importlib.metadata import version

import mlflow
import numpy as np
import torch

from nnmamba.models import build_model
from pipelines.model_logging import log_network, model_signature


def test_a_logged_network_carries_its_schema_and_pins_and_loads_back_identical(tmp_path):
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    torch.manual_seed(0)
    network = build_model("segmentation", "mic", 2, 3, base_channels=4, blocks_per_stage=1).eval()
    arch = {"in_channels": 2, "out_channels": 3}
    (tmp_path / "arch.json").write_text("{}")
    with mlflow.start_run() as run:
        log_network(network, arch, (16, 16, 16), dense=True, registered_name="row",
                    extra_files=[str(tmp_path / "arch.json")])
    uri = f"runs:/{run.info.run_id}/model"
    info = mlflow.models.get_model_info(uri)
    assert info.signature.inputs.inputs[0].shape == (-1, 2, 16, 16, 16)
    assert info.signature.outputs.inputs[0].shape == (-1, 3, 16, 16, 16)
    requirements = set(open(mlflow.artifacts.download_artifacts(f"{uri}/requirements.txt")).read().split())
    assert {f"torch=={version('torch').split('+')[0]}", f"nnmamba=={version('nnmamba')}",
            f"monai=={version('monai')}"} <= requirements
    loaded = mlflow.pytorch.load_model("models:/row/1")
    image = torch.randn(1, 2, 16, 16, 16)
    with torch.no_grad():
        assert np.array_equal(loaded(image).numpy(), network(image).numpy())


def test_a_classifier_schema_has_no_spatial_output():
    signature = model_signature({"in_channels": 1, "out_channels": 2}, (32, 32, 32), dense=False)
    assert signature.outputs.inputs[0].shape == (-1, 2)
