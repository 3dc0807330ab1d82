"""Model size and compute of every row of a study's tables, from the study's exported bundles.

Parameters are counted once per shared tensor. Multiply-adds are PyTorch's FlopCounterMode
counts halved (what thop and fvcore call "FLOPs", as the paper's GFLOPs are: convolutions,
linear layers and matrix products, attention included), of one 1-sample forward pass at the
asked input shape. nnMamba's count is the exact affine model in the voxel count
(`nnmamba.complexity.measure_macs`); a competitor is rebuilt for the shape (the ViT-based ones
are built for one input size) and run on PyTorch's meta device, which counts without computing.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from nnmamba.backbones import NNMAMBA
from nnmamba.checkpoint import ARCH_FILE, model_from_arch
from nnmamba.complexity import count_macs, measure_macs
from nnmamba.models import count_parameters
from pipelines import workspace

PAPER_PATCH = (128, 128, 128)
COUNTER = ("GMACs: multiply-adds of one 1-sample forward pass, PyTorch FlopCounterMode FLOPs / 2 (the paper's "
           "\"FLOPs\"; convolutions, linear layers and matrix products, attention included).")


@dataclass(frozen=True)
class RowComplexity:
    parameters: int
    macs: Callable[[Sequence[int]], int | None]   # input shape (no batch, no channels) -> multiply-adds

    def cells(self, shape: Sequence[int]) -> list[str]:
        """`Params (M)` and `GMACs` at `shape`, as the tables print them."""
        return [f"{self.parameters / 1e6:.2f}", self.gmacs(shape)]

    def gmacs(self, shape: Sequence[int]) -> str:
        """GMACs at `shape`, "–" for a network that cannot take it (nnU-Net's topology at another patch)."""
        macs = self.macs(shape)
        return "–" if macs is None else f"{macs / 1e9:.2f}"


def row_complexity(study: str) -> dict[str, RowComplexity]:
    """Per table row (nnMamba variant or backbone): size and compute, from its first seed's bundle."""
    measured = {}
    for trial in sorted(workspace.load_trials(study)["trials"], key=lambda t: t["seed"]):
        if trial["variant"] not in measured:
            arch = json.loads((Path(trial["model_dir"]) / ARCH_FILE).read_text())
            measured[trial["variant"]] = _measure(arch)
    return measured


def _measure(arch: dict) -> RowComplexity:
    model = model_from_arch(arch)
    if arch.get("backbone", NNMAMBA) == NNMAMBA:
        return RowComplexity(count_parameters(model), measure_macs(model, arch["in_channels"]))

    def macs(shape: Sequence[int]) -> int | None:
        try:
            rebuilt = model_from_arch({**arch, "input_shape": list(shape)}).to("meta")
        except ValueError:
            return None
        return count_macs(rebuilt, (1, arch["in_channels"], *shape))

    return RowComplexity(count_parameters(model), macs)


def shape_label(shape: Sequence[int]) -> str:
    return "1×" + "×".join(str(size) for size in shape)
