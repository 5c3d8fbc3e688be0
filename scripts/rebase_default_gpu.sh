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
# start beside it. The result is RUN_DIR/model (float16); evaluate it with `unclip eval
# RUN_DIR/model` and ship it with scripts/ship_default.py.
#
# Environment: DECODER_MIN (8), PRIOR_MIN (2.5), DECODER_BATCH (1024), WORKERS (data-loader workers
# per stage, 4), PYTHON (the interpreter with unclip installed; python3).
set -uo pipefail

run=${1:?usage: scripts/rebase_default_gpu.sh RUN_DIR CLIP_DIR [MODEL]}
clip=${2:?usage: scripts/rebase_default_gpu.sh RUN_DIR CLIP_DIR [MODEL]}
model=${3:-src/unclip/assets/model}
python=${PYTHON:-python3}
unclip=("$python" -m unclip)
export TQDM_MININTERVAL=${TQDM_MININTERVAL:-15}
mkdir -p "$run"
workers=${WORKERS:-4}
started=$(date +%s)
say() { echo "[$(( $(date +%s) - started )) s] $*"; }

"${unclip[@]}" train decoder --preset shapes-gpu --clip "$clip" --init "$model" --run-dir "$run/decoder" --no-eval \
    --minutes "${DECODER_MIN:-8}" --set decoder.train.batch_size="${DECODER_BATCH:-1024}" \
    --set decoder.train.lr=2e-4 --set decoder.train.warmup_steps=100 --set decoder.train.num_workers="$workers" \
    >"$run/decoder.log" 2>&1 &
decoder=$!
for kind in diffusion ar; do
    "${unclip[@]}" train prior --kind "$kind" --preset shapes-gpu --clip "$clip" --run-dir "$run/${kind}_prior" \
        --no-eval --minutes "${PRIOR_MIN:-2.5}" --set prior.train.num_workers="$workers" \
        --set ar_prior.train.num_workers="$workers" >"$run/${kind}_prior.log" 2>&1 &
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
