"""Our nnU-Net-style plan against nnunetv2's own planner on the same raw dataset.

Writes a synthetic nnU-Net v2 dataset (CT, anisotropic voxels), plans it with the `prepare` stage's
planner (`pipelines.tasks.segmentation.plan_study`, the paper profile's `amos_ct` settings: 12 GB
memory budget, 32 base channels) and with nnunetv2 (`nnUNetv2_extract_fingerprint`,
`nnUNetv2_plan_experiment`, its default ExperimentPlanner, 3d_fullres), and records both: target
spacing, patch size, batch size, normalisation, and the network topology (pooling per stage and
conv kernels; ours is what the `nnunet` backbone builds from our plan). nnunetv2 lists axes in
array order (z, y, x); they are reversed here to our (x, y, z).

    python benchmarks/nnunet_plan_crosscheck.py --out benchmarks/results/cpu_vm/nnunet_plan_crosscheck.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from _common import REPO, code_version, machine

sys.path.insert(0, str(REPO))

from nnunetv2.experiment_planning.experiment_planners.network_topology import get_pool_and_conv_props  # noqa: E402

from nnmamba.data.layouts import get_layout  # noqa: E402
from nnmamba.data.synthetic.nnunet import write_synthetic_nnunet  # noqa: E402
from pipelines.params import load_params  # noqa: E402
from pipelines.tasks.segmentation import plan_study  # noqa: E402

DATASET = "Dataset501_Synth"


def ours(raw_root: Path, profile_params: Path) -> dict:
    """The prepare stage's plan of the dataset, with the topology our nnunet backbone builds from it."""
    study = load_params(profile_params).study("amos_ct")
    study = study.model_copy(update={"dataset": study.dataset.model_copy(
        update={"layout": "nnunet", "root": str(raw_root), "reader": {}})})
    _, plan = plan_study(study, get_layout("nnunet").read(raw_root))
    _, pools, kernels, _, _ = get_pool_and_conv_props(plan["target_spacing"], plan["patch_size"], 4, 999999)
    return {"spacing": plan["target_spacing"], "patch_size": plan["patch_size"], "batch_size": plan["batch_size"],
            "normalization": [n["scheme"] for n in plan["normalization"]],
            "strides": [list(p) for p in pools], "kernel_sizes": [list(k) for k in kernels]}


def theirs(work: Path) -> dict:
    """nnunetv2's 3d_fullres configuration of the same dataset, axes reversed to (x, y, z)."""
    env = {**os.environ, "nnUNet_raw": str(work / "raw"), "nnUNet_preprocessed": str(work / "preprocessed"),
           "nnUNet_results": str(work / "results")}
    bin_dir = Path(sys.executable).parent
    for command in (["nnUNetv2_extract_fingerprint", "-d", "501", "-np", "2"], ["nnUNetv2_plan_experiment", "-d", "501"]):
        subprocess.run([str(bin_dir / command[0]), *command[1:]], env=env, check=True, capture_output=True)
    plans = json.loads((work / "preprocessed" / DATASET / "nnUNetPlans.json").read_text())
    config = plans["configurations"]["3d_fullres"]
    arch = config["architecture"]["arch_kwargs"]
    return {"spacing": config["spacing"][::-1], "patch_size": config["patch_size"][::-1],
            "batch_size": config["batch_size"], "normalization": config["normalization_schemes"],
            "strides": [list(s)[::-1] for s in arch["strides"]],
            "kernel_sizes": [list(k)[::-1] for k in arch["kernel_sizes"]]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--cases", type=int, default=6)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="nnunet_crosscheck_"))
    raw = work / "raw" / DATASET
    write_synthetic_nnunet(raw, n_train=args.cases, channels=("CT",), field_of_view_mm=(200.0, 160.0, 150.0),
                           spacing=(0.8, 0.8, 3.0), file_ending=".nii.gz", seed=0)
    profile = work / "params.yaml"  # this checkout's params.yaml with the paper profile selected
    profile.write_text(yaml.safe_dump({**yaml.safe_load((REPO / "params.yaml").read_text()), "profile": "paper"}))
    result = {"benchmark": "nnunet_plan_crosscheck", "machine": machine(), "code": code_version(),
              "dataset": {"cases": args.cases, "channels": ["CT"], "spacing_mm": [0.8, 0.8, 3.0],
                          "field_of_view_mm": [200, 160, 150]},
              "ours": ours(raw, profile), "nnunetv2": theirs(work)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    for key in ("spacing", "patch_size", "batch_size", "normalization", "strides", "kernel_sizes"):
        print(f"{key:13s} ours {result['ours'][key]}\n{'':13s} nnU-Net {result['nnunetv2'][key]}")


if __name__ == "__main__":
    main()
