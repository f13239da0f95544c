"""Karlo-scale unCLIP (Kakao Brain's Karlo v1.0.alpha architecture), for planning and training
on TPU pods: ``unclip plan --config experiments/karlo.py --stage decoder --topology v5p:4x4x4``.

Sizes follow the released Karlo checkpoints (the model presets in ``unclip_jax.models`` carry
the exact hyper-parameters and parameter counts):
  CLIP     ViT-L/14 (text 768 wide, 12 layers, 12 heads; vision 1024 wide, 24 layers, 16 heads,
           patch 14 at 224 px; projection 768)                                   ~428M, frozen
  prior    PriorConfig.karlo(): width 2048, 20 layers, 32 heads, 77 + 4 tokens   ~1.0B
  decoder  karlo_decoder_config(): 64x64 ADM UNet, 320 ch, CLIP tokens + caption  ~893M
  sr       64 -> 256: two karlo_sr_config() UNets, super_res_first (all steps but the last) and
           super_res_last (the last step)                                         ~692M each
Training hyper-parameters (``train``) are not published for Karlo: the values below are the unCLIP
paper's (Ramesh et al. 2022, Table 3) scaled to these model sizes; learning-rate warmup is ours.
"""
import dataclasses

import ml_collections

from unclip_jax.models.prior import PriorConfig
from unclip_jax.models.unet import karlo_decoder_config, karlo_sr_config

_DTYPE_FIELDS = ("dtype", "param_dtype")


def _fields(preset) -> dict:
    """A model preset dataclass -> plain config dict (the dtypes come from ``config.dtype``)."""
    return {k: v for k, v in dataclasses.asdict(preset).items() if k not in _DTYPE_FIELDS}


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.name = "karlo"
    c.dtype = "bfloat16"

    c.clip = dict(
        projection_dim=768,
        text_config=dict(vocab_size=49408, hidden_size=768, intermediate_size=3072,
                         num_hidden_layers=12, num_attention_heads=12,
                         max_position_embeddings=77, projection_dim=768),
        vision_config=dict(image_size=224, patch_size=14, hidden_size=1024,
                           intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                           projection_dim=768),
    )
    c.prior = _fields(PriorConfig.karlo())
    c.decoder = _fields(karlo_decoder_config())
    c.sr = [_fields(karlo_sr_config()),   # super_res_first
            _fields(karlo_sr_config())]   # super_res_last (GAN-tuned; same architecture)

    c.diffusion = ml_collections.ConfigDict()
    c.diffusion.prior = dict(steps=1000, schedule="cosine", model_output="x0",
                             model_var_type="fixed_small", sample_steps="25", sampler="ddpm",
                             guidance=4.0, num_candidates=1, cfg_drop_text=0.2)
    c.diffusion.decoder = dict(steps=1000, schedule="cosine", model_output="eps",
                               model_var_type="learned_range", sample_steps="25", sampler="ddpm",
                               guidance=8.0, cfg_drop_clip=0.1, cfg_drop_text=0.3)
    # Karlo runs super_res_first for 6 respaced steps and super_res_last for the 7th.
    c.diffusion.sr = dict(steps=1000, schedule="linear", model_output="eps",
                          model_var_type="fixed_small", sample_steps="7", sampler="ddpm")

    # Training on a TPU pod slice: `unclip plan` compiles these steps for `tpu.topology` and
    # reports HBM / FLOPs per chip; launch_tpu.sh runs `unclip train <stage>` on all workers.
    c.tpu = dict(topology="v5p:4x4x4")      # v5p-128: 64 chips, 95 GiB HBM each

    def train(**kw):
        base = dict(batch_size=2048, learning_rate=1.2e-4, warmup_steps=10_000,
                    total_steps=800_000, weight_decay=0.0, grad_clip_norm=1.0, accum_steps=1,
                    ema_decay=0.9999, ema_warmup=False, save_every=5_000, keep_last=3,
                    log_every=100, max_nonfinite=10, seed=0, schedule="constant", b1=0.9,
                    b2=0.999, eps=1e-8, mesh=dict(data=-1, fsdp=8, tensor=1))
        base.update(kw)
        return base

    c.train = ml_collections.ConfigDict()
    c.train.prior = train(batch_size=4096, learning_rate=1.1e-4, total_steps=600_000, b2=0.96,
                          eps=1e-6, weight_decay=6.0e-2, mesh=dict(data=-1, fsdp=4, tensor=1))
    c.train.decoder = train(vlb_weight=0.001)
    # Both upsamplers (index 0 = super_res_first, 1 = super_res_last: --set train.sr.index=1)
    # train on quarter-size random crops (64x64 of the 256x256 target) with a blurred low-res.
    c.train.sr = train(batch_size=1024, total_steps=1_000_000, index=0, crop_size=64,
                       blur_sigma=(0.4, 0.6), blur_kernel=3, mesh=dict(data=-1, fsdp=4, tensor=1))
    c.train.inpaint = train(vlb_weight=0.001, total_steps=100_000, init_from="",
                            mask_min_frac=0.25, mask_max_frac=0.75, mask_p_keep_all=0.0)
    return c
