# Shared by the GPU scripts (source it after setting `run`): the unclip command, progress-bar pacing,
# the run folder, a timestamped `say`, and the decoder continuation both scripts use.
# Environment: PYTHON (the interpreter with unclip installed; python3), DECODER_BATCH (1024).
python=${PYTHON:-python3}
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# A lent GPU machine has no diffusers or webdataset and no registry: scripts/gpu_wheels.sh fetched
# them into .whl here, carried with the working tree. Install them, and use src/ as it is.
if ! "$python" -c "import unclip, diffusers, webdataset" 2>/dev/null; then
    if [ -d "$root/.whl" ]; then
        "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target /tmp/unclip-site "$root"/.whl/*.whl || exit 1
        export PYTHONPATH=/tmp/unclip-site:$root/src${PYTHONPATH:+:$PYTHONPATH}
    else
        export PYTHONPATH=$root/src${PYTHONPATH:+:$PYTHONPATH}
    fi
    "$python" -c "import unclip, diffusers, webdataset" || {
        echo "unclip's dependencies do not import with $python: run scripts/gpu_wheels.sh where pip works" \
             "and carry .whl, or install unclip"; exit 1; }
fi
unclip=("$python" -m unclip)
export TQDM_MININTERVAL=${TQDM_MININTERVAL:-15}
mkdir -p "$run"
started=$(date +%s)
say() { echo "[$(( $(date +%s) - started )) s] $*"; }

# continue_decoder CLIP MODEL MINUTES WORKERS: MODEL's decoder (--init) trained on CLIP into $run/decoder, in
# the background (its pid in $!), at batch DECODER_BATCH, lr 2e-4 after 100 warmup steps (docs/model_card.md);
# SCENES (e.g. [0.1,0.8,0.1]) sets data.scenes, the odds of single, pair and count scenes it trains on.
continue_decoder() {
    local scenes=()
    [ -n "${SCENES:-}" ] && scenes=(--set "data.scenes=$SCENES")
    "${unclip[@]}" train decoder --preset shapes-gpu --clip "$1" --init "$2" --run-dir "$run/decoder" --no-eval \
        --minutes "$3" --set decoder.train.batch_size="${DECODER_BATCH:-1024}" \
        --set decoder.train.lr=2e-4 --set decoder.train.warmup_steps=100 --set decoder.train.num_workers="$4" \
        ${scenes[@]+"${scenes[@]}"} >"$run/decoder.log" 2>&1 &
}
