"""A trained model on disk: `arch.json` (how to build it) + `model.pt` (its weights) + `prediction.json`.

The pipeline exports one bundle per trial; evaluation, `nnmamba predict` and users' own scripts
load it without knowing how it was trained. `prediction.json` holds what predicting on a raw image
needs beyond the network: channel and label names, the plan (normalisation, target spacing, crop
margin), the patch size and the sliding-window overlap (see `nnmamba.predict`).
"""

from __future__ import annotations

import io
import json
import pickle
import re
from pathlib import Path

import torch
from torch import nn

from nnmamba.atomic import staged_directory, write_new
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
    """Write a bundle, replacing `directory` as a whole only once every file is written (nnmamba.atomic):
    a failure (a full disk) leaves an earlier bundle there as it was, never a mix of old and new files.

    `arch` needs task, backbone, variant (nnMamba's), in_channels, out_channels, input_shape (the
    patch, or the whole volume for classification) and kwargs. `prediction` is the record
    `nnmamba.predict` needs to run on raw images (optional: a bundle without it can still be loaded
    and evaluated on preprocessed data).
    """
    weights = io.BytesIO()
    torch.save(state_dict, weights)   # in memory: torch's file writer reports a full disk as "unexpected pos"
    with staged_directory(directory) as bundle:
        write_new(bundle / ARCH_FILE, json.dumps(arch, indent=2, sort_keys=True))
        write_new(bundle / WEIGHTS_FILE, weights.getbuffer())
        if prediction is not None:
            write_new(bundle / PREDICTION_FILE, json.dumps(prediction, indent=2, sort_keys=True))


def load_bundle(directory: Path, device: torch.device | str = "cpu") -> tuple[nn.Module, dict]:
    """The trained model (in eval mode, on `device`) and its architecture record."""
    directory = Path(directory)
    for name in (ARCH_FILE, WEIGHTS_FILE):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"{directory} is not a model bundle: {name} is missing")
    arch = json.loads((directory / ARCH_FILE).read_text())
    model = model_from_arch(arch)
    model.load_state_dict(load_weights(directory / WEIGHTS_FILE))
    return model.to(device).eval(), arch


def load_weights(file: Path, map_location: torch.device | str = "cpu") -> dict:
    """A weights file (tensors, containers and plain values only: `torch.load(weights_only=True)`).

    A file that pickles anything else (a class, a function: code that unpickling would run) is
    refused with one line naming the file and the first object torch would not load.
    """
    try:
        return torch.load(file, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(error))
        what = f"pickled {found.group(1)}" if found else str(error).strip().splitlines()[0]
        raise pickle.UnpicklingError(f"{file}: refused to load: it holds more than weights ({what}); only "
                                     "tensors and plain containers are loaded (weights_only=True)") from None


def load_prediction_record(directory: Path) -> dict:
    """The bundle's `prediction.json` (what predicting on raw images needs besides the weights)."""
    path = Path(directory) / PREDICTION_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{directory} has no {PREDICTION_FILE}: it cannot predict on raw images "
                                "(export it with a pipeline that plans its preprocessing)")
    return json.loads(path.read_text())
