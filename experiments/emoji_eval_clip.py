"""Evaluation CLIP for the emoji model (issue "5 of 6", "Measure quality honestly").

Scores R-precision and CLIP-FID in ``benchmarks/quality_emoji.py``. It is trained separately
from the CLIP the emoji unCLIP conditions on -- another seed and another architecture (wider,
deeper, 16 px patches instead of 8, 128-d instead of 192-d embeddings) -- so a decoder cannot
score well by pleasing its own encoder. Same data, tokenizer and train sections as
``experiments/emoji.py`` (read from it, so they stay in step); only ``clip``, ``name`` and the
CLIP run's seed differ::

    unclip train clip --config experiments/emoji_eval_clip.py --workdir runs/eval_clip
    python benchmarks/quality_emoji.py --model MODEL_DIR --eval-clip runs/eval_clip ...
"""
import os

from unclip_jax.config import load_config_file

EVAL_CLIP_DIM = 128
WIDTH = 256
EVAL_SEED_OFFSET = 1000  # the eval CLIP's seed: emoji.py's CLIP seed + this


def get_config():
    c = load_config_file(os.path.join(os.path.dirname(os.path.abspath(__file__)), "emoji.py"))
    c.name = "emoji_eval_clip"
    text_len = c.clip.text_config.max_position_embeddings
    c.clip = dict(
        projection_dim=EVAL_CLIP_DIM,
        text_config=dict(vocab_size=4096, hidden_size=WIDTH, intermediate_size=4 * WIDTH,
                         num_hidden_layers=4, num_attention_heads=8,
                         max_position_embeddings=text_len, projection_dim=EVAL_CLIP_DIM,
                         bos_token_id=4094, eos_token_id=4095, pad_token_id=0),
        vision_config=dict(image_size=64, patch_size=16, hidden_size=WIDTH,
                           intermediate_size=4 * WIDTH, num_hidden_layers=6,
                           num_attention_heads=8, projection_dim=EVAL_CLIP_DIM),
    )
    if "train" in c and "clip" in c.train:
        c.train.clip.seed = int(c.train.clip.get("seed", 0)) + EVAL_SEED_OFFSET
        # a shorter run than the model's CLIP (it only has to rank captions, and it trains
        # beside the decoder on the same 2 cores)
        c.train.clip.total_steps = 300
        c.train.clip.warmup_steps = 30
    return c
