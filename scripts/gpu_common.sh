# Shared by the GPU scripts (source it after setting `run`): the unclip command, progress-bar pacing,
# the run folder, a timestamped `say`, and the decoder continuation both scripts use.
# Environment: PYTHON (the interpreter with unclip installed; python3), DECODER_BATCH (1024).
python=${PYTHON:-python3}
unclip=("$python" -m unclip)
export TQDM_MININTERVAL=${TQDM_MININTERVAL:-15}
mkdir -p "$run"
started=$(date +%s)
say() { echo "[$(( $(date +%s) - started )) s] $*"; }

# continue_decoder CLIP MODEL MINUTES WORKERS: MODEL's decoder (--init) trained on CLIP into $run/decoder, in
# the background (its pid in $!), at batch DECODER_BATCH, lr 2e-4 after 100 warmup steps (docs/model_card.md).
continue_decoder() {
    "${unclip[@]}" train decoder --preset shapes-gpu --clip "$1" --init "$2" --run-dir "$run/decoder" --no-eval \
        --minutes "$3" --set decoder.train.batch_size="${DECODER_BATCH:-1024}" \
        --set decoder.train.lr=2e-4 --set decoder.train.warmup_steps=100 --set decoder.train.num_workers="$4" \
        >"$run/decoder.log" 2>&1 &
}
