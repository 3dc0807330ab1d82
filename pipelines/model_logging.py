"""Logging a trained network as an MLflow PyTorch model, with its schema and requirements given.

Left to infer them, `mlflow.pytorch.log_model` runs the network on the input example (a whole
BraTS-size forward pass on the driver's CPU) and imports the saved model in a subprocess to list its
packages: seconds per model on the CPU VM and most of a minute on the GPU machine (benchmarks/README.md).
Both are known before logging: the tensor shapes from the architecture record, the packages from
this environment.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from importlib.metadata import PackageNotFoundError, version

import mlflow
import numpy as np
from mlflow.environment_variables import MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR
from mlflow.models import ModelSignature
from mlflow.types import Schema, TensorSpec
from torch import nn

# What unpickling a logged model imports: its classes live in nnmamba, MONAI or nnU-Net's networks.
MODEL_PACKAGES = ("torch", "nnmamba", "monai", "dynamic-network-architectures")


def model_signature(arch: dict, input_shape: Sequence[int], dense: bool) -> ModelSignature:
    """float32 [batch, in_channels, *input_shape] in; [batch, out_channels(, *input_shape)] out
    (dense: segmentation and landmark heatmaps; else class logits)."""
    spatial = tuple(int(size) for size in input_shape)
    outputs = (-1, arch["out_channels"], *(spatial if dense else ()))
    return ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, arch["in_channels"], *spatial))]),
                          outputs=Schema([TensorSpec(np.dtype(np.float32), outputs)]))


def model_requirements() -> list[str]:
    """The installed versions of MODEL_PACKAGES, without local labels (torch's `+cpu`), as pip pins."""
    pins = []
    for package in MODEL_PACKAGES:
        try:
            pins.append(f"{package}=={version(package).split('+')[0]}")
        except PackageNotFoundError:
            continue
    return pins


@contextmanager
def _quiet_model_logging() -> Iterator[None]:
    """Without MLflow's per-model noise: the warning on every pickled PyTorch model (that flavour is
    only what `models:/` URIs load; the bundles nnmamba reads are weights-only, nnmamba.checkpoint)
    and the two "Downloading artifacts" progress bars that registering each version prints."""
    logger = logging.getLogger("mlflow.pytorch")
    level, progress = logger.level, os.environ.get(MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR.name)
    logger.setLevel(logging.ERROR)
    os.environ[MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR.name] = "false"
    try:
        yield
    finally:
        logger.setLevel(level)
        if progress is None:
            os.environ.pop(MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR.name, None)
        else:
            os.environ[MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR.name] = progress


def log_network(model: nn.Module, arch: dict, input_shape: Sequence[int], dense: bool, registered_name: str | None,
                extra_files: list[str]) -> None:
    """Log `model` into the active run as `model/` (registering it under `registered_name` when given)."""
    with _quiet_model_logging():
        mlflow.pytorch.log_model(model, name="model", signature=model_signature(arch, input_shape, dense),
                                 pip_requirements=model_requirements(), registered_model_name=registered_name,
                                 serialization_format="pickle", extra_files=extra_files)
