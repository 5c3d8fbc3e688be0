#!/usr/bin/env bash
# Move a model onto another CLIP on one GPU: both priors trained afresh against it, the decoder
# continued from the model's weights on it, the upsampler kept; then assemble a float16 model.
#
#   scripts/rebase_default_gpu.sh RUN_DIR CLIP_DIR [MODEL]
#
# CLIP_DIR is a CLIP fine-tuned from MODEL's (default: the shipped src/unclip/assets/model) with
# `unclip train clip --init MODEL`, e.g. the relation-aware one of docs/clip.md ("Binding"): the
# decoder already draws from MODEL's embedding space and only has to follow the fine-tune's move,
# so it continues (`--init`) rather than starting over. The priors are small and train from the
# start beside it, or from MODEL's priors when CLIP_DIR kept MODEL's image tower (a text-tower
# fine-tune, `--set clip.train_towers=text`: every z_i is unchanged; docs/clip.md "Binding").
# The result is RUN_DIR/model (float16); evaluate it with `unclip eval
# RUN_DIR/model` and ship it with scripts/ship_default.py.
#
# Environment: DECODER_MIN (8), PRIOR_MIN (2.5), DECODER_BATCH (1024), WORKERS (data-loader workers
# per stage, 4), PYTHON (the interpreter with unclip installed; python3).
set -uo pipefail

run=${1:?usage: scripts/rebase_default_gpu.sh RUN_DIR CLIP_DIR [MODEL]}
clip=${2:?usage: scripts/rebase_default_gpu.sh RUN_DIR CLIP_DIR [MODEL]}
model=${3:-src/unclip/assets/model}
workers=${WORKERS:-4}
source "$(dirname "$0")/gpu_common.sh"

continue_decoder "$clip" "$model" "${DECODER_MIN:-8}" "$workers"
decoder=$!
# A CLIP that kept MODEL's image tower (clip.train_towers=text) keeps every z_i: its priors start from MODEL's.
prior_init=()
if "$python" -c "import json, sys; sys.exit(json.load(open('$clip/unclip.json'))['config']['clip'].get('train_towers') != 'text')"; then
    prior_init=(--init "$model")
fi
for kind in diffusion ar; do
    "${unclip[@]}" train prior --kind "$kind" --preset shapes-gpu --clip "$clip" --run-dir "$run/${kind}_prior" \
        --no-eval --minutes "${PRIOR_MIN:-2.5}" --set prior.train.num_workers="$workers" \
        --set ar_prior.train.num_workers="$workers" "${prior_init[@]}" >"$run/${kind}_prior.log" 2>&1 &
    eval "${kind}=\$!"
done
failed=0
for job in $decoder $diffusion $ar; do wait "$job" || failed=1; done
if [ "$failed" != 0 ]; then
    say "a stage failed (logs in $run); the same command resumes it from its checkpoint"; exit 1
fi
say "trained"
"${unclip[@]}" assemble --decoder "$run/decoder/model" --prior "$run/diffusion_prior/model" \
    --ar-prior "$run/ar_prior/model" --upsampler "$model" --out "$run/model" --half || exit 1
say "model (float16): $run/model"
