#!/usr/bin/env bash
# One CPU round of the shipped emoji model, from a fresh machine to a measured candidate model:
# data + embeddings, the evaluation CLIP, STEPS more decoder steps from the shipped weights (or INIT), the
# inpainting decoder re-tuned from that decoder, export, the shipped-model test on the candidate,
# and the quality tables of both splits (rounds 4-6 ran these steps by hand; round 7 ran this script).
#
#   bash experiments/emoji_cpu_round.sh NAME [STEPS]   # e.g. r7 4000 (~1.5 h of decoder on 2 cores)
#
# Everything is resumable: the trainers resume from their workdirs, finished steps are skipped,
# so after an interruption run the same command again. Outputs, with R = $R (runs/emoji):
#   R/NAME/decoder, R/NAME/inpaint   training runs (metrics.jsonl, checkpoints)
#   R/NAME/model                     the candidate model dir (bf16, like the shipped one)
#   R/NAME/quality_train, quality_test   benchmarks/quality_emoji.py results and grids
# The candidate is NOT swapped into the package: look at the numbers, then
#   rm -r unclip_jax/assets/emoji_model && cp -r R/NAME/model unclip_jax/assets/emoji_model
#   python -m pytest tests/test_shipped_model.py && git add -A unclip_jax/assets/emoji_model
# and commit at once (the runs folder does not outlive the machine).
# Env: R (runs/emoji), DATA_DIR (tfds data, ~/tensorflow_datasets), LR (2e-4), STOP_AT (stop the
#   decoder at this step of its STEPS-step cosine schedule: a time budget; default STEPS), INPAINT_STEPS
#   (300), QUALITY (1; 0 skips the ~32 min of quality runs), PY (python3), DEC_CONFIG (extra
#   --config.decoder.* overrides for the decoder, inpainting decoder and export, e.g.
#   "--config.decoder.attention_resolutions=(16,8)": a decoder grown from the shipped one with
#   train.decoder.init_partial, new modules starting fresh; round 8 ran this), CFG (the shipped
#   model's config: experiments/emoji16.py since round 12; rounds 7 and 8 ran experiments/emoji.py),
#   INIT (where the decoder starts: the shipped model dir, or a decoder training workdir, whose
#   fp32 EMA weights round 16 continued from instead of the model dir's bf16 copy).
set -euo pipefail
NAME=${1:?usage: emoji_cpu_round.sh NAME [STEPS]}
STEPS=${2:-4000}
PY=${PY:-python3}
R=${R:-runs/emoji}
DATA_DIR=${DATA_DIR:-$HOME/tensorflow_datasets}
M=unclip_jax/assets/emoji_model
W=$R/$NAME
CFG=${CFG:-experiments/emoji16.py}
mkdir -p "$W"
read -r -a DEC <<< "${DEC_CONFIG:-}"
GROW=()
[ -z "${DEC_CONFIG:-}" ] || GROW=(--config.train.decoder.init_partial=true)
log() { echo "[$(date +%H:%M:%S)] $*"; }
unclip() { $PY -m unclip_jax.cli "$@"; }

log "1/7 data and embeddings (skipped when there)"
DATA_DIR=$DATA_DIR R=$R PY=$PY bash experiments/emoji_gpu_prep.sh

log "2/7 evaluation CLIP"
unclip train clip --config experiments/emoji_eval_clip.py --workdir "$R/eval_clip" \
  --data "tfds:emoji_dataset:train@$DATA_DIR" --no-progress

INIT=${INIT:-$M}
log "3/7 decoder: $STEPS steps from $INIT"
unclip train decoder --config $CFG --workdir "$W/decoder" --data "$R/embeddings" --no-progress \
  "${DEC[@]}" "${GROW[@]}" --config.train.decoder.init_from="$INIT" --config.train.decoder.total_steps="$STEPS" \
  --config.train.decoder.warmup_steps=100 --config.train.decoder.learning_rate="${LR:-2e-4}" \
  --steps "${STOP_AT:-$STEPS}"

log "4/7 inpainting decoder from it"
unclip train inpaint --config $CFG --workdir "$W/inpaint" --data "$R/embeddings" --no-progress \
  "${DEC[@]}" --config.train.inpaint.init_from="$W/decoder" \
  --config.train.inpaint.total_steps="${INPAINT_STEPS:-300}"

log "5/7 export -> $W/model"
# every upsampler of the shipped model, by index (`--sr DIR:N`; emoji16 has two)
SR=()
NUM_SR=$($PY -c "import json, sys; print(len(json.load(open(sys.argv[1]))['config']['sr']))" $M/unclip.json)
for ((i = 0; i < NUM_SR; i++)); do SR+=(--sr "$M:$i"); done
rm -rf "$W/model"
unclip export --config $CFG "${DEC[@]}" --clip $M --prior $M "${SR[@]}" --decoder "$W/decoder" \
  --inpaint "$W/inpaint" --out "$W/model" --pca-from "$R/embeddings"

log "6/7 the shipped-model test, on the candidate"
UNCLIP_MODEL_UNDER_TEST="$W/model" $PY -m pytest -q tests/test_shipped_model.py

if [ "${QUALITY:-1}" = 1 ]; then
  log "7/7 quality, train split with the guidance sweep, then test"
  Q=(--model "$W/model" --eval-clip "$R/eval_clip" --data-dir "$DATA_DIR"
     --num-concepts 100 --samples-per-concept 1)
  [ -f "$W/quality_train/results.json" ] || $PY benchmarks/quality_emoji.py "${Q[@]}" \
    --splits train --guidance-sweep 1,3,5,8 --out-dir "$W/quality_train"
  [ -f "$W/quality_test/results.json" ] || $PY benchmarks/quality_emoji.py "${Q[@]}" \
    --splits test --guidance-sweep "" --grid-per-prompt 0 --out-dir "$W/quality_test"
fi
log "done: $W/model"
