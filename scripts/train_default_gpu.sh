#!/usr/bin/env bash
# Train the shipped default model (preset shapes-gpu) on one GPU in about nine minutes.
#
#   scripts/train_default_gpu.sh RUN_DIR
#
# The upsampler needs no CLIP, so it trains from the start beside CLIP; when CLIP is written the
# decoder and both priors train beside it, all on the one GPU. Each stage has a wall-clock budget
# (minutes, from the environment) that the trainer fits its warmup + cosine schedule into. At the
# end the stages are assembled into RUN_DIR/model with float16 weights (what the repo ships).
# Evaluation is left to `unclip eval` and the stage metrics, run afterwards on any machine.
#
# Environment: PRESET (shapes-gpu), UPSAMPLER_MIN (7.4), CLIP_MIN (2.0), DECODER_MIN (5.0),
# PRIOR_MIN (2.5), THREADS (torch CPU threads per stage; default: torch's choice), PYTHON (the
# interpreter with unclip installed; python3; on a machine without unclip's dependencies see
# scripts/gpu_wheels.sh), UNCLIP (the command that runs unclip, overriding PYTHON's), CLIP_SET (config overrides for CLIP alone,
# e.g. "clip.hard_negatives=0.75 clip.twin_group=4 clip.twin_weights=[0.5,0,0,0,0.5]": binding
# twins, docs/clip.md "Binding").
set -uo pipefail

run=${1:?usage: scripts/train_default_gpu.sh RUN_DIR}
preset=${PRESET:-shapes-gpu}
source "$(dirname "$0")/gpu_common.sh"  # PYTHON, the .whl bootstrap, `say`, the run folder
[ -n "${UNCLIP:-}" ] && read -r -a unclip <<<"$UNCLIP"
common=(--preset "$preset" --no-eval ${THREADS:+--threads "$THREADS"})

stage() {  # stage NAME ARGS...: run `unclip train ARGS` into RUN_DIR/NAME.log
    local name=$1; shift
    say "start $name"
    if "${unclip[@]}" train "$@" >"$run/$name.log" 2>&1; then say "done $name"; else
        say "FAILED $name (exit $?); last lines of $run/$name.log:"; tail -n 20 "$run/$name.log"; return 1; fi
}

stage upsampler1 upsampler "${common[@]}" --run-dir "$run/upsampler1" --minutes "${UPSAMPLER_MIN:-7.4}" &
upsampler=$!
clip_set=()
for item in ${CLIP_SET:-}; do clip_set+=(--set "$item"); done
stage clip clip "${common[@]}" "${clip_set[@]}" --run-dir "$run/clip" --minutes "${CLIP_MIN:-2.0}" || { wait; exit 1; }
clip=(--clip "$run/clip/model")
stage decoder decoder "${common[@]}" "${clip[@]}" --run-dir "$run/decoder" --minutes "${DECODER_MIN:-5.0}" &
decoder=$!
stage diffusion_prior prior --kind diffusion "${common[@]}" "${clip[@]}" --run-dir "$run/diffusion_prior" \
    --minutes "${PRIOR_MIN:-2.5}" &
prior=$!
stage ar_prior prior --kind ar "${common[@]}" "${clip[@]}" --run-dir "$run/ar_prior" --minutes "${PRIOR_MIN:-2.5}" &
ar_prior=$!
failed=0
for job in $upsampler $decoder $prior $ar_prior; do wait "$job" || failed=1; done
[ "$failed" = 0 ] || { say "a stage failed; its checkpoint is in $run and the same command resumes it"; exit 1; }
"${unclip[@]}" assemble --decoder "$run/decoder/model" --prior "$run/diffusion_prior/model" \
    --ar-prior "$run/ar_prior/model" --upsampler "$run/upsampler1/model" --out "$run/model" --half || exit 1
say "model (float16): $run/model"
