"""Tiny unCLIP for CPU tests and for sampling before a trained model exists.

Random weights: the CLI says so when it uses this config. Sizes are picked so that every stage
compiles and samples in seconds on 2 cores; every conditioning path of the real model is present.
"""
import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.name = "tiny"
    c.dtype = "float32"
    text_len = 77
    clip_dim = 32
    text_width = 32

    c.clip = dict(
        projection_dim=clip_dim,
        text_config=dict(vocab_size=49408, hidden_size=text_width, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=2,
                         max_position_embeddings=text_len, projection_dim=clip_dim),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                           num_hidden_layers=2, num_attention_heads=2, projection_dim=clip_dim),
    )
    c.prior = dict(clip_dim=clip_dim, width=32, num_layers=2, num_heads=2,
                   num_text_tokens=text_len, text_states_dim=text_width)
    c.decoder = dict(image_size=16, model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                     attention_resolutions=(8,), num_head_channels=16, norm_groups=8,
                     learn_sigma=True, clip_dim=clip_dim, clip_emb_mult=4, text_encoder="clip",
                     context_dim=32, text_ctx=text_len, text_states_dim=text_width,
                     text_emb_dim=clip_dim)
    c.sr = [dict(image_size=32, model_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                 attention_resolutions=(), use_middle_attention=False, norm_groups=8,
                 low_res_cond=True, low_res_resize_method="bilinear")]

    # autoregressive prior (``unclip sample --prior ar``): 8 PCA components x 16 buckets
    c.ar_prior = dict(clip_dim=clip_dim, text_states_dim=text_width, num_text_tokens=text_len,
                      pca_dims=8, num_buckets=16, dot_buckets=8, width=32, num_layers=2,
                      num_heads=2, guidance=2.0, temperature=1.0, top_p=1.0, num_candidates=2)

    c.diffusion = ml_collections.ConfigDict()
    c.diffusion.prior = dict(steps=1000, schedule="cosine", model_output="x0",
                             model_var_type="fixed_small", sample_steps="10", sampler="ddpm",
                             guidance=4.0, num_candidates=2, cfg_drop_text=0.1)
    c.diffusion.decoder = dict(steps=1000, schedule="cosine", model_output="eps",
                               model_var_type="learned_range", sample_steps="10", sampler="ddpm",
                               guidance=3.0, cfg_drop_clip=0.1, cfg_drop_text=0.5)
    c.diffusion.sr = dict(steps=1000, schedule="linear", model_output="eps",
                          model_var_type="fixed_small", sample_steps="5", sampler="ddpm")

    # Training, one section per stage (`unclip train STAGE`; see unclip_jax/train/loop.py).
    # mesh: data/fsdp/tensor sizes (-1 = the remaining devices; positive sizes whose product is
    # below the device count use that many devices, with a warning). total_steps: the LR
    # schedule's length and the default --steps. save_every / log_every / eval_every in steps;
    # keep_last checkpoints kept. A step is one batch of batch_size (a micro-batch when
    # accum_steps k > 1: every k-th step applies one update, and the schedule and EMA run over
    # total_steps / k updates). max_nonfinite: abort after that many non-finite losses in a row.
    # eval_every (0 = off) / eval_batches: evaluate the EMA weights on --eval-data.
    def train(**kw):
        base = dict(batch_size=8, learning_rate=1e-4, warmup_steps=100, total_steps=10_000,
                    weight_decay=0.0, grad_clip_norm=1.0, accum_steps=1, ema_decay=0.9999,
                    ema_warmup=True, save_every=500, keep_last=3, log_every=50,
                    max_nonfinite=10, seed=0, mesh=dict(data=-1, fsdp=1, tensor=1))
        base.update(kw)
        return base

    c.train = ml_collections.ConfigDict()
    c.train.clip = train(learning_rate=5e-4, weight_decay=0.1)
    c.train.prior = train(learning_rate=3e-4, weight_decay=0.01)
    # snr_gamma > 0: Min-SNR-gamma weighting of the decoder's L_simple (Hang et al. 2023; 0: off)
    c.train.decoder = train(vlb_weight=0.001, snr_gamma=0.0)
    c.train.sr = train(crop_size=16, blur_sigma=(0.4, 0.6), blur_kernel=3)
    # init_from (any stage; the file may leave it out): a model dir or workdir to start from.
    # init_partial (clip / prior / decoder / sr; default false): the config adds modules to
    # init_from's (e.g. attention at another resolution); those start fresh, the rest is copied.
    # inpaint: fine-tuned from the decoder (init_from: a decoder workdir or a model dir).
    c.train.inpaint = train(vlb_weight=0.001, init_from="", mask_min_frac=0.25,
                            mask_max_frac=0.75, mask_p_keep_all=0.0)
    return c
