#!/usr/bin/env bash
# Prepare, on a fresh CPU machine with network access (the npm registry), what
# experiments/emoji_gpu.sh needs on a GPU machine that has none: the emoji training set's CLIP
# embeddings made with the shipped model, packed into .carry/emoji_train_pack.npz (~20 MB).
#
#   bash experiments/emoji_gpu_prep.sh            # then: run emoji_gpu.sh with carry=[".carry"]
#
# Steps: (1) build the tfds emoji set (downloads the two pinned npm tarballs through tfds's
# download manager; or reads them from MANUAL_DIR), (2) `unclip embed` 3 passes with the shipped
# CLIP, (3) pack. Env: DATA_DIR (tfds data, default ~/tensorflow_datasets), R (work folder,
# runs/emoji), MANUAL_DIR (folder with emoji-datasource-<style>-16.0.0.tgz), PY (python3).
# Each step is skipped when its output is already there, so a rerun resumes.
# The GPU machine loses everything when its session ends: export there, bring the model back
# in $OUT and commit it into unclip_jax/assets/emoji_model in the same session.
set -euo pipefail
PY=${PY:-python3}
DATA_DIR=${DATA_DIR:-$HOME/tensorflow_datasets}
R=${R:-runs/emoji}
M=unclip_jax/assets/emoji_model
PACK=.carry/emoji_train_pack.npz
mkdir -p "$R" .carry

echo "== 1/3 tfds emoji_dataset in $DATA_DIR"
DATA_DIR=$DATA_DIR MANUAL_DIR=${MANUAL_DIR:-} $PY - <<'EOF'
import os
import tensorflow_datasets as tfds
from unclip_jax.data.emoji import EmojiDataset
b = EmojiDataset(data_dir=os.environ["DATA_DIR"])
manual = os.environ.get("MANUAL_DIR") or None
b.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual))
print({k: v.num_examples for k, v in b.info.splits.items()})
EOF

echo "== 2/3 CLIP embeddings -> $R/embeddings"
if [ ! -f "$R/embeddings/embeddings.json" ]; then  # written last: the dir is complete
  rm -rf "$R/embeddings"
  $PY -m unclip_jax.cli embed --model $M --data "tfds:emoji_dataset:train@$DATA_DIR" \
    --out "$R/embeddings" --passes 3 --batch-size 128
fi

echo "== 3/3 pack -> $PACK"
$PY -m unclip_jax.train.embed_pack pack "$R/embeddings" "$PACK"
ls -l "$PACK"
