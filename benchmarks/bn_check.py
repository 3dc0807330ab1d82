"""Is a trial's validation Dice limited by BatchNorm's running statistics? Each checkpoint, both ways.

The networks normalise with BatchNorm, whose running statistics are gathered from the train batches
(2 patches on BraTS). A validation Dice that collapses for one epoch while the train loss stays low
points at them. For every epoch checkpoint of a study's trials (Ray Train's `state.pt`), this
scores the validation cases with the running statistics (what validation and evaluate do) and with
each window's own batch statistics, and prints the running variances' range, into one JSON.

    python benchmarks/bn_check.py --study brats2023 --out bn_check.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from nnmamba.checkpoint import load_bundle  # noqa: E402
from nnmamba.data.preprocessing.preprocess import load_preprocessed  # noqa: E402
from nnmamba.engine import amp_dtype, validation_dice  # noqa: E402
from pipelines import workspace  # noqa: E402
from pipelines.params import load_params  # noqa: E402


def use_batch_statistics(model: nn.Module) -> None:
    """Every BatchNorm normalises with its input's statistics, in eval mode too."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.track_running_stats, module.running_mean, module.running_var = False, None, None


def running_variance_range(model: nn.Module) -> tuple[float, float]:
    variances = [m.running_var for m in model.modules()
                 if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_var is not None]
    return min(v.min().item() for v in variances), max(v.max().item() for v in variances)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--study", default="brats2023")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    study = load_params().studies[args.study]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = amp_dtype(study.train.amp) if device.type == "cuda" else None
    dataset_dir = workspace.path(workspace.PREPROCESSED, study=args.study)
    val_cases = json.loads(workspace.path(workspace.SPLIT, study=args.study).read_text())["val"]
    cases = [(s["image"].data, s["label"].data) for s in (load_preprocessed(dataset_dir, c) for c in val_cases)]
    trials = json.loads(workspace.path(workspace.TRIALS, study=args.study).read_text())["trials"]
    rows = []
    for trial in trials:
        bundle = Path(trial["model_dir"])
        for checkpoint in sorted(ROOT.glob(f"ray_results/{args.study}-{bundle.name}-*/checkpoint_*/state.pt")):
            state = torch.load(checkpoint, map_location=device, weights_only=True)
            scores = {}
            for mode in ("running", "batch"):
                model, _ = load_bundle(bundle, device)
                model.load_state_dict(state["model"])
                low, high = running_variance_range(model)
                if mode == "batch":
                    use_batch_statistics(model)
                dice = validation_dice(model, cases, study.evaluate.regions, study.train.patch_size,
                                       study.train.val_overlap, device, dtype)
                scores[mode] = sum(dice) / len(dice)
            rows.append({"trial": bundle.name, "epoch": state["epoch"], "dice_running_stats": scores["running"],
                         "dice_batch_stats": scores["batch"], "running_var_min": low, "running_var_max": high,
                         "logged_val_dice": state["val_metrics"].get("val_dice_mean")})
            print(json.dumps(rows[-1]), flush=True)
    args.out.write_text(json.dumps({"benchmark": "bn_check", "study": args.study, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
