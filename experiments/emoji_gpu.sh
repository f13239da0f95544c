#!/usr/bin/env bash
# One short lease of one GPU, one call: continue the emoji decoder from the shipped weights for a
# fixed wall-clock budget, re-fine-tune the inpainting decoder from it, export a model dir, and
# (in the same call) measure the Karlo-scale decoder's training MFU in bf16.
#
#   bash experiments/emoji_gpu.sh OUT DEADLINE_S [END_S]
#
# OUT: where results go (run.log, model + decoder checkpoint as a tar split into 15 MiB parts:
#   `cat OUT/results.tar.part-* | tar x`). DEADLINE_S: seconds from the start by which decoder
#   training stops (SIGTERM: the trainer checkpoints and exits). END_S: the whole script's budget
#   (default DEADLINE_S + 200); the inpainting run stops TAIL s before it.
# Inputs in the repo root: .carry/emoji_train_pack.npz (`python -m unclip_jax.train.embed_pack
#   pack R/embeddings .carry/emoji_train_pack.npz`: the 764 MB embeddings dir in 20 MB; unpacked
#   here with the shipped CLIP), and optionally .whl/*.whl (our pinned flax / optax / orbax /
#   ml_collections for a machine that lacks them). Env: BATCH (256), PY (python3),
#   MFU_CONFIG (experiments/karlo.py), MFU_BATCH (64), MFU (1; 0 skips it), STEP_S (seconds per
#   decoder step; skips the probe), TAIL (70: seconds kept after the inpainting run), R (work
#   folder, /tmp/emoji_gpu), DEC_CONFIG (extra --config.decoder.* overrides for the probe, the
#   decoder, the inpainting decoder and the export, e.g. "--config.decoder.model_channels=64"),
#   DEC_INIT (what the decoder starts from: the shipped model (default); "scratch" for a fresh
#   init, as a wider decoder needs; "grow" for the shipped decoder transplanted into DEC_CONFIG's
#   deeper UNet by experiments/grow_decoder.py, e.g. DEC_CONFIG="--config.decoder.channel_mult=
#   (1,2,2,3)" (round 9); with DEC_CONFIG and the default, init_partial grows the shipped
#   decoder by the modules DEC_CONFIG adds).
# The Karlo benchmark compiles in the background while the emoji runs use the GPU and times its
#   steps only after they finish (benchmarks/train_throughput.py --wait-for).
set -u
OUT=${1:?usage: emoji_gpu.sh OUT DEADLINE_S [END_S]}
DEADLINE=${2:?deadline in seconds}
END=${3:-$((DEADLINE + 200))}
B=${BATCH:-256}
PY=${PY:-python3}
M=unclip_jax/assets/emoji_model
R=${R:-/tmp/emoji_gpu}
T0=$(date +%s)
mkdir -p "$OUT" "$R"
exec > >(tee -a "$OUT/run.log") 2>&1
now() { echo $(( $(date +%s) - T0 )); }
log() { echo "[$(now)s] $*"; }
read -r -a DEC <<< "${DEC_CONFIG:-}"

export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PYTHONPATH
fi
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
$PY -c "import jax, flax, optax, orbax.checkpoint as o, ml_collections; \
print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, jax.devices())"
DEC_INIT=${DEC_INIT:-$M}
INIT=()
if [ "$DEC_INIT" = grow ]; then
  rm -rf "$R/grown"
  $PY experiments/grow_decoder.py --model $M --out "$R/grown" --config experiments/emoji.py \
    "${DEC[@]}" || exit 1
  DEC_INIT=$R/grown
fi
if [ "$DEC_INIT" != scratch ]; then
  INIT=(--config.train.decoder.init_from="$DEC_INIT")
  [ -z "${DEC_CONFIG:-}" ] || INIT+=(--config.train.decoder.init_partial=true)
fi

# 1. Karlo-scale decoder MFU: compile now (CPU), time later on an otherwise idle GPU.
GO=$R/mfu_go
MFU_PID=
[ "${MFU:-1}" = 1 ] && ( XLA_PYTHON_CLIENT_MEM_FRACTION=0.6 timeout $((END - 5)) $PY benchmarks/train_throughput.py \
    --config "${MFU_CONFIG:-experiments/karlo.py}" --stage decoder --batch "${MFU_BATCH:-64}" --dtype bfloat16 \
    --steps 10 --wait-for "$GO" > "$R/mfu.txt" 2>&1; echo "mfu exit $?" >> "$R/mfu.txt" ) &
[ "${MFU:-1}" = 1 ] && MFU_PID=$!
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.25

# 2. The emoji training data, rebuilt with the shipped CLIP.
log unpack
$PY -m unclip_jax.train.embed_pack unpack .carry/emoji_train_pack.npz --model $M \
  --out $R/embeddings --no-progress --batch-size 1024 || {
  log "unpack failed: no training; the GPU is the benchmark's"
  touch "$GO"; [ -n "$MFU_PID" ] && { wait $MFU_PID; cat "$R/mfu.txt"; }; exit 1; }

# 3. Throughput of the emoji decoder step at this batch -> the schedule length that fits.
if [ -z "${STEP_S:-}" ]; then
  log probe
  $PY benchmarks/train_throughput.py --config experiments/emoji.py --stage decoder \
    --batch "$B" --steps 30 "${DEC[@]}" | tee "$R/probe.txt"
  STEP_S=$(sed -n 's/.*step_s=\([0-9.]*\).*/\1/p' "$R/probe.txt")
fi
LEFT=$((DEADLINE - $(now) - 45))  # 45 s: the trainer's start, compile and final save
STEPS=$($PY -c "print(max(500, int($LEFT / (${STEP_S:-0.05} * 1.15)) // 100 * 100))")
log "decoder: batch $B, ${STEP_S}s/step measured, $STEPS steps planned in ${LEFT}s"

# 4. Decoder: from the shipped weights (DEC_INIT), fresh cosine schedule of STEPS, stopped at DEADLINE.
timeout -s TERM -k 60 $((DEADLINE - $(now))) $PY -m unclip_jax.cli train decoder \
  --config experiments/emoji.py --workdir $R/decoder --data $R/embeddings --no-progress \
  "${DEC[@]}" "${INIT[@]}" --config.train.decoder.batch_size="$B" \
  --config.train.decoder.total_steps="$STEPS" --config.train.decoder.save_every=2000 \
  --config.train.decoder.log_every=200
log "decoder exit $?"

# 5. Inpainting decoder from it (GLIDE-style extra channels), a short schedule.
INP_S=$(( END - ${TAIL:-70} - $(now) ))  # TAIL s left to export, pack and time the MFU
timeout -s TERM -k 30 $INP_S $PY -m unclip_jax.cli train inpaint --config experiments/emoji.py \
  --workdir $R/inpaint --data $R/embeddings --no-progress "${DEC[@]}" \
  --config.train.inpaint.init_from=$R/decoder --config.train.inpaint.batch_size="$B" \
  --config.train.inpaint.total_steps=600 --config.train.inpaint.warmup_steps=50 \
  --config.train.inpaint.save_every=300 --config.train.inpaint.log_every=100
log "inpaint exit $?"
touch "$GO"  # the GPU is free: the Karlo benchmark times its steps now

# 6. Export (prior, CLIP, upsampler: the shipped ones) and pack the results.
INP=(--inpaint $R/inpaint)
if ! ls -d $R/inpaint/[0-9]* >/dev/null 2>&1; then
  # no inpainting checkpoint: the shipped one, which fits only the shipped decoder config
  if [ -z "${DEC_CONFIG:-}" ]; then INP=(--inpaint $M); else INP=(); fi
fi
$PY -m unclip_jax.cli export --config experiments/emoji.py "${DEC[@]}" --clip $M --prior $M --sr $M \
  --decoder $R/decoder "${INP[@]}" --out $R/model --pca-from $R/embeddings
log "export exit $?"
LAST=$(ls $R/decoder 2>/dev/null | grep -E '^[0-9]+$' | sort -n | tail -1)
tar cf - -C $R model decoder/metrics.jsonl inpaint/metrics.jsonl \
  ${LAST:+decoder/$LAST} 2>/dev/null | split -b 15M - "$OUT/results.tar.part-"
log "packed: $(ls "$OUT")"

if [ -n "$MFU_PID" ]; then wait $MFU_PID; cat "$R/mfu.txt"; fi
log done
