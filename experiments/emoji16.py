"""The emoji unCLIP with a 16 px decoder and two upsamplers (16 -> 32 -> 64): rounds 11 to 16
(round 16 is the shipped model).

Why: the decoder-ceiling rows of ``benchmarks/quality_emoji.py`` (real images shrunk to the
decoder's size, then through the upsamplers) show what resolution costs. Real train-concept
images score R-precision 0.811 at 64 px, 0.827 shrunk to 32 px and put through the shipped
32 -> 64 upsampler, and 0.719 shrunk to 16 px and put through that same upsampler twice
(16 -> 32, then 32 -> 64; it is convolutional, so the weights serve both). So a 16 px decoder
still leaves room above the 0.6 goal, at about a third of the CPU cost per training image of the
32 px one (~70 against ~25 images/s on 2 cores): three times the training for the same hours.

Everything but the decoder and the upsampler list is ``experiments/emoji.py`` (read from it, so
the two stay in step). The decoder is round 10's 4-level UNet (``channel_mult=(1, 2, 2, 3)``)
with its attention at the same level, now 4 px; its weights carry over unchanged (no parameter
depends on the image size). Upsampler 0 (16 -> 32) and upsampler 1 (32 -> 64) are both the
shipped 32 -> 64 upsampler. Commands (M: the round-6 shipped model, R10M: round 10's model dir
``unclip export``ed as in ``experiments/emoji.py``; R = runs/emoji)::

    unclip train decoder --config experiments/emoji16.py --workdir R11/decoder \\
        --data R/embeddings --config.train.decoder.init_from=R10M \\
        --config.train.decoder.total_steps=11000 --config.train.decoder.warmup_steps=100 \\
        --config.train.decoder.learning_rate=2e-4
    unclip train inpaint --config experiments/emoji16.py --workdir R11/inpaint \\
        --data R/embeddings --config.train.inpaint.init_from=R11/decoder \\
        --config.train.inpaint.total_steps=300
    unclip export --config experiments/emoji16.py --clip M --prior M --sr M:0 --sr M:0 \\
        --decoder R11/decoder --inpaint R11/inpaint --out R11/model --pca-from R/embeddings

Measured (session 15; README, "Round 11"): train unCLIP R-precision 0.470 on the reported draw
(round 6: 0.470), 0.515 on the validation draw (round 6: 0.450); caption only 0.29, CLIP text
emb 0.45, oracle image emb 0.51 (round 6: 0.21, 0.35, 0.39). Not shipped: a tie where reported.

Round 12 (session 15; shipped): round 11 with the prior trained 1000 more steps (R11M: round
11's model dir)::

    unclip train prior --config experiments/emoji16.py --workdir R12/prior --data R/embeddings \
        --config.train.prior.init_from=M --config.train.prior.total_steps=1000 \
        --config.train.prior.warmup_steps=50 --config.train.prior.learning_rate=2e-4
    unclip export --config experiments/emoji16.py --clip M --prior R12/prior --sr R11M --sr R11M \
        --decoder R11M --inpaint R11M --out NEW_M --pca-from R/embeddings

Train unCLIP R-precision 0.520 on the reported draw, 0.535 on the validation draw.

Round 13 (session 16; shipped): round 12 with the decoder trained 7000 more steps from round
11's (R11/decoder; R12M: round 12's model dir)::

    unclip train decoder --config experiments/emoji16.py --workdir R13/decoder \
        --data R/embeddings --config.train.decoder.init_from=R11/decoder \
        --config.train.decoder.total_steps=7000 --config.train.decoder.warmup_steps=100 \
        --config.train.decoder.learning_rate=1.5e-4
    unclip export --config experiments/emoji16.py --clip R12M --prior R12M --sr R12M:0 \
        --sr R12M:1 --decoder R13/decoder --inpaint R12M --out NEW_M --pca-from R/embeddings

Train unCLIP R-precision 0.530 on the reported draw, 0.555 on the validation draw.

Round 14 (session 17; shipped): round 13 with its decoder trained 18000 more steps from the
shipped model dir's EMA weights (M: round 13's model dir, i.e. unclip_jax/assets/emoji_model
before this round; R14 = runs/s17)::

    unclip train decoder --config experiments/emoji16.py --workdir R14/dec16 \
        --data R/embeddings --config.train.decoder.init_from=M \
        --config.train.decoder.total_steps=18000 --config.train.decoder.warmup_steps=100 \
        --config.train.decoder.learning_rate=1.5e-4
    unclip train inpaint --config experiments/emoji16.py --workdir R14/inpaint \
        --data R/embeddings --config.train.inpaint.init_from=R14/dec16 \
        --config.train.inpaint.total_steps=300
    unclip export --config experiments/emoji16.py --clip M --prior M --sr M:0 --sr M:1 \
        --decoder R14/dec16 --inpaint R14/inpaint --out NEW_M --pca-from R/embeddings \
        --storage-dtype bfloat16

Train unCLIP R-precision 0.530 on the reported draw (a tie with round 13), 0.580 on the
validation draw, 0.485 on a tiebreak draw (seed 2; round 13 also 0.485).

Round 16 (session 18; shipped; round 15 was a prior candidate, not adopted): round 14's decoder
trained 22000 more steps, continued from the fp32 EMA weights of round 14's training workdir
(R14/dec16) rather than the bf16 model dir. Run by hand as round 14's three commands with R16
(runs/s18) for R14, M the round-14 model dir, and the decoder's flags changed to
``--config.train.decoder.init_from=R14/dec16 --config.train.decoder.total_steps=22000
--config.train.decoder.learning_rate=1e-4``; the same round in one command, with the quality
runs (``R``, ``DATA_DIR`` as in that script)::

    INIT=R14/dec16 LR=1e-4 bash experiments/emoji_cpu_round.sh r16 22000

Train unCLIP R-precision 0.600 on the reported draw (round 14: 0.530), 0.635 on the validation
draw (0.580), 0.560 on the seed-2 draw (0.485).

Round 17 (session 19; measured, not shipped): round 16's decoder 12000 more steps from its fp32
EMA weights (R16/dec16), lr 8e-5::

    INIT=R16/dec16 LR=8e-5 QUALITY=0 bash experiments/emoji_cpu_round.sh r17 12000

0.540 on the reported draw and 0.545 on the seed-2 draw (round 16: 0.600, 0.560): not adopted.
"""
import os

from unclip_jax.config import load_config_file

DECODER_SIZE = 16


def get_config():
    c = load_config_file(os.path.join(os.path.dirname(os.path.abspath(__file__)), "emoji.py"))
    c.name = "emoji16"
    c.decoder.image_size = DECODER_SIZE
    c.decoder.channel_mult = (1, 2, 2, 3)
    c.decoder.attention_resolutions = (DECODER_SIZE // 4,)  # the third level, as at 32 px
    sr = dict(c.sr[0])
    c.sr = [dict(sr, image_size=2 * DECODER_SIZE), dict(sr, image_size=4 * DECODER_SIZE)]
    return c
