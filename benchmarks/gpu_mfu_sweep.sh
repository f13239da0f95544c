#!/usr/bin/env bash
# One GPU call: the Karlo-scale decoder's training MFU (bf16) for a few variants side by side,
# so one short lease answers "which flag closes the gap to 40%" (issue 4).
#
#   bash benchmarks/gpu_mfu_sweep.sh OUT [BUDGET_S]
#
# Runs benchmarks/train_throughput.py once per variant (same process settings, same GPU, one
# after another) and writes OUT/VARIANT.log for each plus OUT/summary.tsv (variant, batch,
# step_s, images_per_s, mfu). A variant that fails or passes its share of BUDGET_S (default 480)
# is recorded as such and the sweep goes on. The first variant (the baseline, the likeliest to
# run) also writes a jax.profiler trace of 3 steps to OUT/trace. Env: CONFIG (experiments/karlo.py), STEPS (10), PY (python3),
# VARIANTS (space-separated NAME=BATCH:OVERRIDES entries, overrides joined by '+'; see below).
# On a CPU machine `CONFIG=experiments/tiny.py DTYPE=float32 bash benchmarks/gpu_mfu_sweep.sh
# /tmp/sweep` checks the plumbing in a minute (MFU is n/a there).
set -u
OUT=${1:?usage: gpu_mfu_sweep.sh OUT [BUDGET_S]}
BUDGET=${2:-480}
CONFIG=${CONFIG:-experiments/karlo.py}
STEPS=${STEPS:-10}
PY=${PY:-python3}
DTYPE=${DTYPE:-bfloat16}
VARIANTS=${VARIANTS:-"einsum_b64=64: cudnn_b64=64:--config.decoder.attention_impl=cudnn \
cudnn_b128=128:--config.decoder.attention_impl=cudnn"}
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
mkdir -p "$OUT"
T0=$(date +%s)
set -- $VARIANTS
N=$#
printf "variant\tbatch\tstep_s\timages_per_s\tmfu\n" > "$OUT/summary.tsv"
i=0
for v in "$@"; do
  i=$((i + 1))
  name=${v%%=*}; rest=${v#*=}; batch=${rest%%:*}; ovr=${rest#*:}
  left=$(( BUDGET - ($(date +%s) - T0) ))
  share=$(( left / (N - i + 1) ))
  if [ "$share" -lt 30 ]; then
    printf "%s\t%s\tskipped (budget)\t\t\n" "$name" "$batch" >> "$OUT/summary.tsv"; continue
  fi
  extra=()
  [ -n "$ovr" ] && extra=(${ovr//+/ })
  [ "$i" -eq 1 ] && extra+=(--profile "$OUT/trace")
  echo "== $name: batch $batch ${extra[*]:-} (limit ${share}s)"
  timeout -s INT "$share" $PY benchmarks/train_throughput.py --config "$CONFIG" --stage decoder \
    --batch "$batch" --steps "$STEPS" --dtype "$DTYPE" "${extra[@]}" > "$OUT/$name.log" 2>&1
  rc=$?
  tail -n 6 "$OUT/$name.log"
  step=$(sed -n 's/.*step_s=\([0-9.]*\).*/\1/p' "$OUT/$name.log" | tail -n 1)
  ips=$(sed -n 's/^images_per_s=\([0-9.]*\).*/\1/p' "$OUT/$name.log" | tail -n 1)
  mfu=$(sed -n 's/^mfu=\([0-9.a-z/]*\).*/\1/p' "$OUT/$name.log" | tail -n 1)
  [ "$rc" -ne 0 ] && step=${step:-"failed rc=$rc"}
  printf "%s\t%s\t%s\t%s\t%s\n" "$name" "$batch" "${step:-}" "${ips:-}" "${mfu:-}" \
    >> "$OUT/summary.tsv"
done
echo "== summary ($(( $(date +%s) - T0 )) s)"
column -t -s $'\t' "$OUT/summary.tsv" 2>/dev/null || cat "$OUT/summary.tsv"
