"""A trained model on disk: `arch.json` (how to build it) + `model.pt` (its weights).

The pipeline exports one bundle per trial; evaluation, `nnmamba predict` and users' own scripts
load it without knowing how it was trained.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from nnmamba.models import build_model

ARCH_FILE = "arch.json"
WEIGHTS_FILE = "model.pt"


def model_from_arch(arch: dict) -> nn.Module:
    """Build the untrained network an architecture record describes."""
    return build_model(arch["task"], arch["variant"], arch["in_channels"], arch["out_channels"], **arch["kwargs"])


def save_bundle(directory: Path, arch: dict, state_dict: dict) -> None:
    """Write a bundle; `arch` needs task, variant, in_channels, out_channels and kwargs."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / ARCH_FILE).write_text(json.dumps(arch, indent=2, sort_keys=True))
    torch.save(state_dict, directory / WEIGHTS_FILE)


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
