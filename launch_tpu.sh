#!/usr/bin/env bash
# Create (or reuse) a Cloud TPU VM / pod slice, put this repository on every worker, install it
# with the TPU extra and run the same `unclip train` command on all workers at once.
#
#   ./launch_tpu.sh --name unclip-v5p --zone us-east5-a --accelerator-type v5p-128 \
#       --project my-proj --config experiments/karlo.py --stage decoder \
#       --workdir gs://my-bucket/karlo/decoder [--detach] [--dry-run] [-- extra train args]
#
# On a slice with several workers the training command exports UNCLIP_DISTRIBUTED=1 (each worker
# counts the slice's workers in the GCE metadata), so `unclip train` calls
# jax.distributed.initialize() and the workers form one JAX job.
#
# Plan first (no TPU needed): unclip plan --config experiments/karlo.py --stage decoder \
#       --topology v5p-128
# --dry-run prints the gcloud commands instead of running them.
set -euo pipefail

usage() {
  cat <<'EOF'
usage: launch_tpu.sh --name NAME --zone ZONE --accelerator-type TYPE --config FILE
                     --stage prior|decoder|sr --workdir DIR [options] [-- TRAIN_ARGS...]
  --name NAME               TPU VM name (created if it does not exist, else reused)
  --zone ZONE               e.g. us-east5-a
  --accelerator-type TYPE   e.g. v4-32, v5p-128, v5litepod-16, v6e-16
  --runtime-version VER     TPU software version (default: by accelerator family)
  --project PROJECT         GCP project (default: gcloud's configured project)
  --config FILE             experiments/<name>.py (path inside the repository)
  --stage STAGE             prior | decoder | sr
  --workdir DIR             checkpoints + logs, a gs:// path for pods (same on all workers)
  --git URL                 clone / pull URL on the workers instead of copying this checkout
  --branch BRANCH           branch for --git (default: main)
  --remote-dir DIR          code directory on the workers (default: unclip_jax)
  --spot                    create a Spot TPU
  --detach                  start training under nohup on every worker (log: REMOTE_DIR/train-STAGE.log)
                            and return, so a dropped ssh connection does not stop it
  --dry-run                 print the commands instead of running them
  -h, --help                this help
Everything after `--` is appended to the `unclip train` command.
EOF
}

NAME="" ZONE="" ACCEL="" RUNTIME="" PROJECT="" CONFIG="" STAGE="" WORKDIR=""
GIT_URL="" BRANCH="main" REMOTE_DIR="unclip_jax" SPOT=0 DRY_RUN=0 DETACH=0
EXTRA=()

need_value() {
  if [[ $# -lt 2 || -z "$2" ]]; then
    echo "launch_tpu.sh: $1 needs a value" >&2
    exit 2
  fi
}

while [[ $# -gt 0 ]]; do
  case "$1" in
    --name) need_value "$@"; NAME="$2"; shift 2 ;;
    --zone) need_value "$@"; ZONE="$2"; shift 2 ;;
    --accelerator-type) need_value "$@"; ACCEL="$2"; shift 2 ;;
    --runtime-version) need_value "$@"; RUNTIME="$2"; shift 2 ;;
    --project) need_value "$@"; PROJECT="$2"; shift 2 ;;
    --config) need_value "$@"; CONFIG="$2"; shift 2 ;;
    --stage) need_value "$@"; STAGE="$2"; shift 2 ;;
    --workdir) need_value "$@"; WORKDIR="$2"; shift 2 ;;
    --git) need_value "$@"; GIT_URL="$2"; shift 2 ;;
    --branch) need_value "$@"; BRANCH="$2"; shift 2 ;;
    --remote-dir) need_value "$@"; REMOTE_DIR="$2"; shift 2 ;;
    --spot) SPOT=1; shift ;;
    --detach) DETACH=1; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; EXTRA=("$@"); break ;;
    *) echo "launch_tpu.sh: unknown argument: $1" >&2; usage >&2; exit 2 ;;
  esac
done

missing=()
for var in NAME ZONE ACCEL CONFIG STAGE WORKDIR; do
  [[ -n "${!var}" ]] || missing+=("$var")
done
if [[ ${#missing[@]} -gt 0 ]]; then
  echo "launch_tpu.sh: missing: ${missing[*]} (see --help)" >&2
  exit 2
fi
case "$STAGE" in
  prior|decoder|sr) ;;
  *) echo "launch_tpu.sh: --stage must be prior, decoder or sr (got $STAGE)" >&2; exit 2 ;;
esac

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
if [[ -z "$GIT_URL" && ! -f "$REPO_ROOT/$CONFIG" ]]; then
  echo "launch_tpu.sh: config not found: $REPO_ROOT/$CONFIG (give a path inside the repository)" >&2
  exit 2
fi

if [[ -z "$RUNTIME" ]]; then
  case "$ACCEL" in
    v4-*) RUNTIME="tpu-ubuntu2204-base" ;;
    v5litepod-*|v5e-*) RUNTIME="v2-alpha-tpuv5-lite" ;;
    v5p-*) RUNTIME="v2-alpha-tpuv5" ;;
    v6e-*) RUNTIME="v2-alpha-tpuv6e" ;;
    *) echo "launch_tpu.sh: no default --runtime-version for $ACCEL; pass one" >&2; exit 2 ;;
  esac
fi

LOC=(--zone "$ZONE")
[[ -n "$PROJECT" ]] && LOC+=(--project "$PROJECT")

# Single-quote one word for printing when it needs it.
quote() {
  if [[ "$1" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

# Print (dry run: copy-pasteable, shell-quoted) or run one command.
run() {
  if [[ $DRY_RUN -eq 1 ]]; then
    local out="" a
    for a in "$@"; do out+="$(quote "$a") "; done
    echo "${out% }"
  else
    "$@"
  fi
}

# Run a command on every worker of the slice.
on_all_workers() {
  run gcloud compute tpus tpu-vm ssh "$NAME" "${LOC[@]}" --worker=all --command "$1"
}

# 1. Create the TPU VM unless it exists.
CREATE=(gcloud compute tpus tpu-vm create "$NAME" "${LOC[@]}"
        --accelerator-type "$ACCEL" --version "$RUNTIME")
[[ $SPOT -eq 1 ]] && CREATE+=(--spot)
if [[ $DRY_RUN -eq 1 ]]; then
  echo "# create the TPU VM unless it exists (checked with: gcloud compute tpus tpu-vm describe $NAME ...)"
  run "${CREATE[@]}"
elif gcloud compute tpus tpu-vm describe "$NAME" "${LOC[@]}" >/dev/null 2>&1; then
  echo "reusing TPU VM $NAME"
else
  run "${CREATE[@]}"
fi

# 2. Code on every worker: git clone / pull, or a tarball of this checkout.
if [[ -n "$GIT_URL" ]]; then
  [[ $DRY_RUN -eq 1 ]] && echo "# fetch the code on all workers"
  on_all_workers "if [ -d $REMOTE_DIR/.git ]; then git -C $REMOTE_DIR fetch origin $BRANCH && git -C $REMOTE_DIR checkout $BRANCH && git -C $REMOTE_DIR pull --ff-only origin $BRANCH; else git clone --branch $BRANCH $GIT_URL $REMOTE_DIR; fi"
else
  TARBALL="${TMPDIR:-/tmp}/unclip_jax_code.tar.gz"
  [[ $DRY_RUN -eq 1 ]] && echo "# copy this checkout to all workers"
  run tar -czf "$TARBALL" -C "$REPO_ROOT" --exclude=.git --exclude='*.egg-info' \
      --exclude=__pycache__ --exclude=.venv .
  run gcloud compute tpus tpu-vm scp "$TARBALL" "$NAME:unclip_jax_code.tar.gz" "${LOC[@]}" --worker=all
  on_all_workers "mkdir -p $REMOTE_DIR && tar -xzf unclip_jax_code.tar.gz -C $REMOTE_DIR"
fi

# 3. Install with the TPU extra (jax[tpu] = jax + libtpu).
[[ $DRY_RUN -eq 1 ]] && echo "# install on all workers"
on_all_workers "cd $REMOTE_DIR && python3 -m pip install -U pip && python3 -m pip install -e '.[tpu]'"

# 4. The same training command on every worker (JAX's multi-host runtime connects them).
TRAIN="unclip train $STAGE --config $CONFIG --workdir $WORKDIR"
for a in "${EXTRA[@]+"${EXTRA[@]}"}"; do TRAIN+=" $(printf '%q' "$a")"; done
# A slice with several workers is one JAX job: count them in the GCE metadata (as JAX's own
# cluster detection does) and ask `unclip train` to call jax.distributed.initialize().
ENDPOINTS=http://metadata.google.internal/computeMetadata/v1/instance/attributes/worker-network-endpoints
MULTI='n=$(curl -sf -H Metadata-Flavor:Google '"$ENDPOINTS"' | tr , "\n" | grep -c . || true); '
MULTI+='echo "$(hostname): ${n:-0} worker(s) in the slice metadata"; '
MULTI+='if [ "${n:-1}" -gt 1 ]; then export UNCLIP_DISTRIBUTED=1; fi'
# braces: a failed cd stops the chain (the training command never runs in the wrong folder)
PRELUDE="cd $REMOTE_DIR && export PATH=\$HOME/.local/bin:\$PATH && { $MULTI; }"
if [[ $DETACH -eq 1 ]]; then
  LOG="train-$STAGE.log"
  [[ $DRY_RUN -eq 1 ]] && echo "# train on all workers, detached (log: $REMOTE_DIR/$LOG on each worker)"
  on_all_workers "$PRELUDE && nohup $TRAIN > $LOG 2>&1 < /dev/null &"
  echo "follow worker 0: gcloud compute tpus tpu-vm ssh $NAME ${LOC[*]} --worker=0 --command 'tail -f $REMOTE_DIR/$LOG'"
else
  [[ $DRY_RUN -eq 1 ]] && echo "# train on all workers"
  on_all_workers "$PRELUDE && $TRAIN"
fi
