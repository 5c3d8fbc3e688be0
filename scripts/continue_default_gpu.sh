#!/usr/bin/env bash
# Continue a model's decoder and upsampler on one GPU, side by side, then assemble a float16 model.
#
#   scripts/continue_default_gpu.sh RUN_DIR [MODEL]
#
# MODEL (default: the repository's shipped src/unclip/assets/model) gives the starting weights (`--init`), the
# CLIP and the priors, which are kept. This is how version 2 of the shipped model was made
# (docs/model_card.md): decoder at batch 1,024 (the GPU is busy 95–100% at that size, against a
# host-bound ~2,200 images/s at 256), upsampler at batch 512, each with its own minute budget that
# the trainer fits warmup + cosine into. The result is RUN_DIR/model (float16); evaluate it with
# `unclip eval RUN_DIR/model --per-group 2` and ship it with scripts/ship_default.py.
#
# Environment: DECODER_MIN (6.3), UPSAMPLER_MIN (5.4; 0 keeps MODEL's upsampler and trains the decoder
# alone), DECODER_BATCH (1024), UPSAMPLER_BATCH (512), SCENES (the decoder's data.scenes, e.g. [0.1,0.8,0.1]),
# WORKERS (data-loader workers per stage, 6), PYTHON (the interpreter with unclip installed; python3),
# RAW (1: also RUN_DIR/model_raw, the decoder's raw weights instead of its EMA; scripts/raw_decoder.py;
# judge both: over version 4's 1,873 steps the EMA's 0.999 averaged half the run, and the raw
# weights judged 0.802 against its 0.755 on the three binding tasks, docs/model_card.md),
# STOP_AFTER (seconds after which the training gets a SIGTERM and stops after its step in hand with
# a checkpoint; the script then exits 2 without assembling, and the same command resumes the
# schedule, each call fitting its end into that call's DECODER_MIN/UPSAMPLER_MIN: one schedule
# across calls of limited length), PACK (a folder, e.g. $OUT on a lent device: the decoders' own files,
# gzip'd in 16 MB parts that a device call brings back; scripts/unpack_decoders.py completes them into
# whole models here). On a machine without unclip's dependencies, see scripts/gpu_wheels.sh.
set -uo pipefail

run=${1:?usage: scripts/continue_default_gpu.sh RUN_DIR [MODEL]}
model=${2:-$(cd "$(dirname "$0")/.." && pwd)/src/unclip/assets/model}
workers=${WORKERS:-6}
case ${STOP_AFTER:-0} in
    ''|*[!0-9]*) echo "STOP_AFTER=$STOP_AFTER: give whole seconds, e.g. STOP_AFTER=450"; exit 1 ;;
esac
source "$(dirname "$0")/gpu_common.sh"

upsampler_min=${UPSAMPLER_MIN:-5.4}
continue_decoder "$model" "$model" "${DECODER_MIN:-6.3}" "$workers"
pids=($!) stages=(decoder) upsampler=$model  # UPSAMPLER_MIN=0 keeps MODEL's upsampler, the GPU all the decoder's
if [ "$upsampler_min" != 0 ]; then
    "${unclip[@]}" train upsampler --stage 1 --preset shapes-gpu --init "$model" --run-dir "$run/upsampler1" --no-eval \
        --minutes "$upsampler_min" --set upsamplers.0.train.batch_size="${UPSAMPLER_BATCH:-512}" \
        --set upsamplers.0.train.lr=1e-4 --set upsamplers.0.train.warmup_steps=100 \
        --set upsamplers.0.train.num_workers="$workers" >"$run/upsampler1.log" 2>&1 &
    pids+=($!) stages+=(upsampler1) upsampler=$run/upsampler1/half
fi
alive() { local job; for job in "${pids[@]}"; do kill -0 "$job" 2>/dev/null && return 0; done; return 1; }
if [ -n "${STOP_AFTER:-}" ]; then  # poll, so that no sleeping helper outlives the script
    while alive; do
        if [ -z "${signalled:-}" ] && [ $(( $(date +%s) - started )) -ge "$STOP_AFTER" ]; then
            say "STOP_AFTER=$STOP_AFTER: SIGTERM to the training, which checkpoints after its step in hand"
            kill -TERM "${pids[@]}" 2>/dev/null; signalled=1
        fi
        sleep 2
    done
fi
failed=0 stopped=0 early=0
for job in "${pids[@]}"; do
    wait "$job"
    case $? in
        0) ;;
        75) stopped=1 ;;  # unclip's status for a run stopped by the SIGTERM, with a checkpoint
        143) if [ -n "${signalled:-}" ]; then early=1; else failed=1; fi ;;  # killed before its handler was set
        *) failed=1 ;;
    esac
done
if [ "$failed" != 0 ]; then
    say "a stage failed: see the end of its log in $run (decoder.log, upsampler1.log)"; exit 1
elif [ "$early" != 0 ]; then
    say "STOP_AFTER=$STOP_AFTER came before the training started (no checkpoint); give it more seconds"; exit 1
elif [ "$stopped" != 0 ]; then
    say "stopped with checkpoints (logs in $run): the same command resumes, with the minutes left as DECODER_MIN/UPSAMPLER_MIN"
    exit 2
fi
say "trained"
# The decoder directory re-saves the CLIP it loaded in float32; halved, its files are byte-identical
# to a float16 MODEL's, which is what assemble compares (sha256) to accept MODEL's priors beside it.
"$python" -c "from unclip.modeldir import half_model_dir
for stage in '${stages[*]}'.split():
    half_model_dir('$run/' + stage + '/model', '$run/' + stage + '/half')" || exit 1
ranker=()  # MODEL's ranking text tower, if it has one, ranks the new model's candidates too
[ -d "$model/rank_text_encoder" ] && ranker=(--ranker "$model")
"${unclip[@]}" assemble --decoder "$run/decoder/half" --prior "$model" --ar-prior "$model" "${ranker[@]}" \
    --upsampler "$upsampler" --out "$run/model" --half || exit 1
say "model (float16): $run/model"
if [ "${RAW:-0}" = 1 ]; then  # the decoder's raw weights too, to judge against the EMA ones
    "$python" "$root/scripts/raw_decoder.py" "$run/decoder" "$run/decoder_raw" || exit 1
    "$python" -c "from unclip.modeldir import half_model_dir; half_model_dir('$run/decoder_raw', '$run/decoder_raw_half')" \
        || exit 1
    "${unclip[@]}" assemble --decoder "$run/decoder_raw_half" --prior "$model" --ar-prior "$model" "${ranker[@]}" \
        --upsampler "$upsampler" --out "$run/model_raw" --half || exit 1
    say "model with the decoder's raw weights (float16): $run/model_raw"
fi
if [ -n "${PACK:-}" ]; then  # what changed, small enough to come back: a device call returns 64 MiB at most
    mkdir -p "$PACK" || exit 1
    parts=(decoder text_proj unclip.json)
    [ "$upsampler_min" != 0 ] && parts+=(super_res_first)
    for name in model model_raw; do  # gzip -1: xz -6 of the two decoders outlasted the 26 s left of a call
        [ -d "$run/$name" ] || continue
        tar -C "$run/$name" -cf - "${parts[@]}" | gzip -1 \
            | split -b 16000000 - "$PACK/$name.tgz." || exit 1
    done
    say "packed: $(ls "$PACK" | tr '\n' ' ')(here: python scripts/unpack_decoders.py PARTS_DIR $run)"
fi
