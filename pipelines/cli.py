"""The `nnmamba` command line.

    nnmamba predict --model models/amos_ct/miccss-seed0 --input scans/ --output labels/ [--tta] [--device cpu]
    nnmamba predict -m models/brats2023/miccss-seed0 -i BraTS2023/ -o labels/ --save-probabilities
    nnmamba predict --model models:/nnmamba-seg-amos_ct-nnmamba-miccss@best --input amos_0507.nii.gz --output labels/
    nnmamba predict -m models/fetal_cerebellum/miccss-seed0 -i scans/ -o points/     # <case>.json, RAS world mm
    nnmamba predict -m models/adni_ad/miccss-seed0 -i scans/ -o out/                 # out/probabilities.csv

`--model` is a model bundle folder (what `dvc repro` exports to `models/<study>/<variant>-seed<seed>/`)
or a registered MLflow model, `models:/<name>/<version>` or `models:/<name>@<alias>` (`@best`: the
version with the best validation score, pipelines/registry.py) (tracking URI: `--tracking-uri`, else
MLFLOW_TRACKING_URI, else params.yaml's `mlflow.tracking_uri`). The prediction itself is the library's
(`nnmamba.predict`); this module only resolves the model, so the library never imports MLflow.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn

from nnmamba.checkpoint import load_bundle, load_prediction_record
from nnmamba.data.errors import DataError
from nnmamba.predict import find_input_cases, predict_task

REGISTRY_SCHEME = "models:/"


def load_model(spec: str, device: torch.device, tracking_uri: str | None = None) -> tuple[nn.Module, dict]:
    """The model (eval mode, on `device`) and its prediction record, from a bundle folder or `models:/...`."""
    if spec.startswith(REGISTRY_SCHEME):
        return _from_registry(spec, device, tracking_uri)
    model, _ = load_bundle(Path(spec), device)
    return model, load_prediction_record(Path(spec))


def _from_registry(uri: str, device: torch.device, tracking_uri: str | None) -> tuple[nn.Module, dict]:
    """Download a registered model; the bundle's JSON files travel in its `extra_files/`."""
    import mlflow  # lazy: predicting from a bundle folder needs no MLflow

    from pipelines.params import load_params
    from pipelines.tracking import tracking_uri as default_tracking_uri

    mlflow.set_tracking_uri(tracking_uri or default_tracking_uri(load_params().mlflow))
    with tempfile.TemporaryDirectory() as directory:
        local = mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=directory)
        model = mlflow.pytorch.load_model(local, map_location=device)
        record = load_prediction_record(Path(local) / "extra_files")
    return model.to(device).eval(), record


def predict(args: argparse.Namespace) -> list[Path]:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, record = load_model(args.model, device, args.tracking_uri)
    cases = find_input_cases(Path(args.input), record["channels"])
    written = predict_task(model, record, cases, Path(args.output), device=device, tta=args.tta, overlap=args.overlap,
                           save_probabilities=args.save_probabilities)
    task = record["task"]
    outputs = {"segmentation": f"{len(cases)} label file(s)", "landmark": f"{len(cases)} landmark file(s) (.json, RAS mm)",
               "classification": f"the class probabilities of {len(cases)} case(s) ({written[0].name})"}[task]
    probabilities = f" and {len(cases)} probability file(s) (.npz)" if args.save_probabilities else ""
    print(f"predict: {outputs}{probabilities} in {args.output}")
    return written


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nnmamba", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    predict_parser = commands.add_parser("predict", help="segment, locate landmarks or classify raw images with a trained model")
    # nnU-Net's short flags beside the long ones (nnUNetv2_predict -i ... -o ...).
    predict_parser.add_argument("-m", "--model", required=True,
                                help="model bundle folder, models:/<name>/<version> or models:/<name>@best")
    predict_parser.add_argument("-i", "--input", required=True,
                                help="an image file, a folder of image files or a folder of case folders (BraTS)")
    predict_parser.add_argument("-o", "--output", required=True, help="folder for the label files, landmark JSON files or probabilities.csv")
    predict_parser.add_argument("--tta", action="store_true", help="mirror test-time augmentation along the axes the model was evaluated with (segmentation: 8 views)")
    predict_parser.add_argument("-d", "--device", choices=["cpu", "cuda"], help="default: cuda when available")
    predict_parser.add_argument("--save-probabilities", "--save_probabilities", action="store_true",
                                help="also write <case>.npz: the class probabilities on the label file's grid")
    predict_parser.add_argument("--overlap", type=float, help="sliding-window overlap (default: the model's)")
    predict_parser.add_argument("--tracking-uri", help="MLflow tracking URI for models:/ (default: see above)")
    predict_parser.set_defaults(run=predict)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except (DataError, FileNotFoundError) as error:
        sys.exit(f"nnmamba {args.command}: {error}")


if __name__ == "__main__":
    main()
