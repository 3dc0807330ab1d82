"""A trained model on disk: `arch.json` (how to build it) + `model.pt` (its weights) + `prediction.json`.

The pipeline exports one bundle per trial; evaluation, `nnmamba predict` and users' own scripts
load it without knowing how it was trained. `prediction.json` holds what predicting on a raw image
needs beyond the network: channel and label names, the plan (normalisation, target spacing, crop
margin), the patch size and the sliding-window overlap (see `nnmamba.predict`).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from nnmamba.backbones import NNMAMBA, build_network

ARCH_FILE = "arch.json"
WEIGHTS_FILE = "model.pt"
PREDICTION_FILE = "prediction.json"


def model_from_arch(arch: dict) -> nn.Module:
    """Build the untrained network an architecture record describes.

    Bundles written before competitor backbones existed have no `backbone` (they are nnMamba's)
    and no `input_shape` (nnMamba takes any multiple of 16).
    """
    return build_network(arch["task"], arch.get("backbone", NNMAMBA), arch.get("variant"), arch["in_channels"],
                         arch["out_channels"], arch.get("input_shape", ()), **arch["kwargs"])


def save_bundle(directory: Path, arch: dict, state_dict: dict, prediction: dict | None = None) -> None:
    """Write a bundle; `arch` needs task, backbone, variant (nnMamba's), in_channels, out_channels,
    input_shape (the patch, or the whole volume for classification) and kwargs.

    `prediction` is the record `nnmamba.predict` needs to run on raw images (optional:
    a bundle without it can still be loaded and evaluated on preprocessed data).
    """
    directory.mkdir(parents=True, exist_ok=True)
    (directory / ARCH_FILE).write_text(json.dumps(arch, indent=2, sort_keys=True))
    torch.save(state_dict, directory / WEIGHTS_FILE)
    if prediction is not None:
        (directory / PREDICTION_FILE).write_text(json.dumps(prediction, indent=2, sort_keys=True))


def load_bundle(directory: Path, device: torch.device | str = "cpu") -> tuple[nn.Module, dict]:
    """The trained model (in eval mode, on `device`) and its architecture record."""
    directory = Path(directory)
    for name in (ARCH_FILE, WEIGHTS_FILE):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"{directory} is not a model bundle: {name} is missing")
    arch = json.loads((directory / ARCH_FILE).read_text())
    model = model_from_arch(arch)
    model.load_state_dict(torch.load(directory / WEIGHTS_FILE, map_location="cpu", weights_only=True))
    return model.to(device).eval(), arch


def load_prediction_record(directory: Path) -> dict:
    """The bundle's `prediction.json` (what predicting on raw images needs besides the weights)."""
    path = Path(directory) / PREDICTION_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{directory} has no {PREDICTION_FILE}: it cannot predict on raw images "
                                "(export it with a pipeline that plans its preprocessing)")
    return json.loads(path.read_text())
