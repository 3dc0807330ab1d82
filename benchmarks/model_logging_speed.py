"""`mlflow.pytorch.log_model` of one small nnMamba network three ways: with an input example (MLflow
runs the network and infers the requirements), without one (still infers the requirements by
importing the saved model in a subprocess), and as the export logs it (`pipelines.model_logging`:
signature and pins given). Median of `--repeats` per way, into one JSON.

    python benchmarks/model_logging_speed.py --out benchmarks/results/cpu_vm/model_logging_speed.json
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import mlflow
import torch

from _common import ResultFile
from nnmamba.models import build_model
from pipelines.model_logging import log_network

ARCH = {"in_channels": 4, "out_channels": 4}
SHAPE = (32, 32, 32)


def timed(log) -> float:
    with mlflow.start_run():
        started = time.perf_counter()
        log()
        return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    model = build_model("segmentation", "miccss", 4, 4, base_channels=8, blocks_per_stage=1).eval()
    example = torch.zeros(1, 4, *SHAPE).numpy()
    ways = {
        "input_example": lambda: mlflow.pytorch.log_model(model, name="model", input_example=example,
                                                          serialization_format="pickle"),
        "inferred_requirements": lambda: mlflow.pytorch.log_model(model, name="model", serialization_format="pickle"),
        "given_signature_and_pins": lambda: log_network(model, ARCH, SHAPE, dense=True, registered_name=None,
                                                        extra_files=[]),
    }
    out = ResultFile(args.out, {"benchmark": "model_logging_speed", "shape": list(SHAPE), "repeats": args.repeats})
    with tempfile.TemporaryDirectory() as store:
        mlflow.set_tracking_uri(f"sqlite:///{store}/mlflow.db")   # and the artifacts beside it, not in ./mlruns
        mlflow.set_experiment(experiment_id=mlflow.create_experiment("speed", artifact_location=f"{store}/artifacts"))
        for name, log in ways.items():
            times = [timed(log) for _ in range(args.repeats)]
            print(f"{name:26s} {statistics.median(times):.3f} s", flush=True)
            out.add({"way": name, "median_s": statistics.median(times), "times_s": times})


if __name__ == "__main__":
    main()
