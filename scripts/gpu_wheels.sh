#!/usr/bin/env bash
# Fetch the wheels a lent GPU machine lacks into .whl/ (git-ignored), for the GPU scripts to install there.
#
#   scripts/gpu_wheels.sh            # here, with the registries in reach (about 20 MB)
#
# The GPU machines the shipped model was trained on (lent, docs/model_card.md) hold Python 3.12 with
# torch, accelerate, transformers, safetensors, tokenizers and regex, but no diffusers or webdataset,
# and reach no registry. Carry .whl with the working tree: scripts/gpu_common.sh, which
# continue_default_gpu.sh and rebase_default_gpu.sh source, installs the wheels into
# /tmp/unclip-site and puts them and src/ on PYTHONPATH when unclip does not import there. The
# versions are the ones unclip is tested with here; transformers and regex come too, so the GPU runs
# the same text-tower code as this machine.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-.venv/bin/python}
[ -x "$python" ] || python=python3
mkdir -p .whl
"$python" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
    --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
    diffusers==0.42.1 transformers==5.24.0 webdataset==1.0.2 braceexpand==0.1.7 regex==2026.11.19
ls -1 .whl
du -sh .whl
