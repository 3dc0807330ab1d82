#!/usr/bin/env bash
# One-time set-up on a fresh machine: a virtual environment with nnmamba and the pipeline stack.
# torch is pinned first so pip does not pull a multi-GB CUDA build onto CPU machines; on a GPU
# machine install your CUDA build of torch (and `pip install -e ".[cuda]"`) instead.
set -euo pipefail
cd "$(dirname "$0")"
python3 -m venv .venv
.venv/bin/pip install --quiet --upgrade pip
.venv/bin/pip install --quiet "torch==2.13.0"
# The pin holds while the rest installs: nnU-Net's chain (timm -> torchvision) would swap in a CUDA torch.
echo "torch==2.13.0" > .venv/constraints.txt
.venv/bin/pip install --quiet -c .venv/constraints.txt -e ".[dev]"
