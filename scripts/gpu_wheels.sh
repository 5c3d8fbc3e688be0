#!/usr/bin/env bash
# Fetch the wheels a lent GPU machine lacks into .whl/ (git-ignored), for the GPU scripts to install there.
#
#   scripts/gpu_wheels.sh            # here, with the registries in reach (about 7 MB)
#
# The GPU machines the shipped model was trained on (lent, docs/model_card.md) hold Python 3.12 with
# torch, accelerate, transformers, safetensors, tokenizers and regex, but no diffusers or webdataset,
# and reach no registry. Carry .whl with the working tree: scripts/gpu_common.sh, which
# continue_default_gpu.sh and rebase_default_gpu.sh source, installs the wheels into
# /tmp/unclip-site and puts them and src/ on PYTHONPATH when unclip does not import there. The
# versions are the ones unclip is tested with here. transformers stays the machine's own (5.17 in
# session 23, against 5.24 here): its 13.5 MB wheel took the carried tree (49.6 MiB tracked, most of
# it the shipped model) past the 64 MiB a device call sends; the towers load and train under 5.17.
# The one trace of the older version is the "transformers_version" line it writes into the towers'
# config.json files, which `unclip assemble` leaves out of its comparison (docs/pipeline.md); a model
# brought back in part and completed here from the shipped files records those two files' sha256
# afresh in its unclip.json (scripts/unpack_decoders.py does; docs/model_card.md, version 4).
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-.venv/bin/python}
[ -x "$python" ] || python=python3
mkdir -p .whl
"$python" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
    --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
    diffusers==0.42.1 webdataset==1.0.2 braceexpand==0.1.7 regex==2026.11.19
ls -1 .whl
du -sh .whl
