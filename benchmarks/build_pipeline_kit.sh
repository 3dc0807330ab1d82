#!/usr/bin/env bash
# The pipeline's Python packages for the device machine (Python 3.12, its own torch), packed to fit
# the 64 MiB a call carries: .gpukit/pipeline-site.tar.xz (everything the stages import that the
# device image lacks, DVC's own stack left out) and .gpukit/ray-slim.tar.xz (Ray without its Java
# jars, RLlib, LLM and dashboard source maps; binaries stripped). Run here, from the repo root, after
# ./setup.sh. A call carries at most 64 MiB with the working tree, so the kit ends up in three parts,
# one per call, each untarred into /tmp/site there, in this order: .gpukit/a (the mamba-ssm kernels
# of ../shared/gpu and the MONAI wheel, enough for model_speed.py), .gpukit/b (pipeline-site),
# .gpukit/c (ray-slim). Calls must follow each other within the machine's 30 s of idle, and stage
# outputs must live outside the checkout (NNMAMBA_WORKSPACE=/tmp/ws): the device tool deletes the
# untracked, unignored data/ of a fresh checkout at every call (benchmarks/README.md, #15 at 1b9704c).
set -euo pipefail
KIT=.gpukit WH=.gpukit/wfull SITE=/tmp/nnmamba-kit-site RAY=/tmp/nnmamba-kit-ray
PLATFORMS="--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64"
mkdir -p "$WH"
# The device image's packages (KINDS.md), then what this venv has beyond them, at the same versions.
python3 - > "$KIT/missing.txt" <<'PY'
import re, subprocess
image = re.search(r"Packages: (.*?)\.\n", open("/work/.library/device/KINDS.md").read(), re.S).group(1)
have = {name.strip() for name in image.split(",")}
frozen = subprocess.run([".venv/bin/pip", "list", "--format=freeze"], capture_output=True, text=True).stdout
for line in frozen.split():
    name, version = line.split("==")
    name = name.lower().replace("_", "-")
    if name not in have and name != "nnmamba":
        print(f"{name}=={version}")
PY
# DVC and what only it (or Ray's runtime-env tooling, nnU-Net's TIFF codecs) needs: the device runs the stages' commands.
DVC_ONLY='^(dvc|scmrepo|pygit2|dulwich|gto|hydra-core|omegaconf|antlr4|celery|kombu|amqp|billiard|vine|huey|asyncssh|virtualenv|py-spy|imagecodecs|iterative-telemetry|sqltrie|pygtrie|dpath|dictdiffer|flufl|zc\.lockfile|shtab|voluptuous|funcy|grandalf|pydot|configobj|atpublic|flatten-dict|shortuuid|tomlkit|semver|click-didyoumean|click-plugins|click-repl|prompt-toolkit|wcwidth|diskcache|appdirs|aiohttp-retry|distro|distlib|python-discovery|truststore|ruamel|pyflakes|acvl-utils)'
grep -vE "$DVC_ONLY" "$KIT/missing.txt" > "$KIT/kit.txt"
for requirement in $(cat "$KIT/kit.txt"); do
  .venv/bin/pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $PLATFORMS -d "$WH" "$requirement"
done
rm -rf "$SITE" "$RAY" && mkdir -p "$SITE" "$RAY"
.venv/bin/pip install -q --no-deps --no-compile --target "$SITE" --python-version 3.12 --implementation cp \
  --only-binary=:all: $(ls "$WH"/*.whl | grep -v '/ray-')
(cd "$RAY" && unzip -q "$(ls "$OLDPWD/$WH"/ray-*.whl)" && rm -rf ray/jars ray/rllib ray/llm ray/dashboard/client/build/static/js/*.map)
rm -rf "$SITE/bin"
find "$SITE" "$RAY" -name "*.so*" -size +1M -print0 | xargs -0 strip --strip-unneeded
strip --strip-unneeded "$RAY"/ray/core/src/ray/raylet/raylet "$RAY"/ray/core/src/ray/gcs/gcs_server
tar cJf "$KIT/pipeline-site.tar.xz" -C "$SITE" .
tar cJf "$KIT/ray-slim.tar.xz" -C "$RAY" .
mkdir -p "$KIT/a/wh" "$KIT/b" "$KIT/c"
cp ../shared/gpu/mamba-kernels-sm90.tar.xz "$KIT/a/" && cp "$WH"/monai-*.whl "$KIT/a/wh/"
mv "$KIT/pipeline-site.tar.xz" "$KIT/b/" && mv "$KIT/ray-slim.tar.xz" "$KIT/c/"
du -sh "$KIT"/a "$KIT"/b "$KIT"/c
