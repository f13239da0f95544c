"""unCLIP paper scale (Ramesh et al. 2022, "Hierarchical Text-Conditional Image Generation with
CLIP Latents"), for planning and training on TPU pods:
``unclip plan --config experiments/paper.py --stage decoder --topology v5p:4x4x8``.

  CLIP     ViT-H/16 (text 1024 wide, 24 layers, 16 heads; vision 1280 wide, 32 layers, 16 heads,
           patch 16 at 224 px; projection 1024)                                      frozen
  prior    PriorConfig.paper(): width 2048, 20 layers, 32 heads (~1B; depth / width are our
           estimate: the paper gives only the parameter count)
  decoder  paper_decoder_config(): GLIDE 64x64 UNet, 512 ch, + GLIDE caption transformer
           (2048 wide, 24 layers, 256 tokens) + 4 CLIP tokens                   ~3.5B
  sr       64 -> 256 (paper_sr1_config, ~700M) and 256 -> 1024 (paper_sr2_config, ~300M), no
           attention, trained on quarter-size random crops
Training hyper-parameters: the paper's Table 3 (batch, iterations, learning rate, Adam beta2 /
eps, weight decay); EMA decay 0.9999; warmup, clipping and the constant schedule are ours.
"""
import dataclasses

import ml_collections

from unclip_jax.models.prior import PriorConfig
from unclip_jax.models.unet import paper_decoder_config, paper_sr1_config, paper_sr2_config

_DTYPE_FIELDS = ("dtype", "param_dtype")


def _fields(preset) -> dict:
    """A model preset dataclass -> plain config dict (the dtypes come from ``config.dtype``)."""
    return {k: v for k, v in dataclasses.asdict(preset).items() if k not in _DTYPE_FIELDS}


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.name = "paper"
    c.dtype = "bfloat16"

    c.clip = dict(
        projection_dim=1024,
        text_config=dict(vocab_size=49408, hidden_size=1024, intermediate_size=4096,
                         num_hidden_layers=24, num_attention_heads=16,
                         max_position_embeddings=77, projection_dim=1024),
        vision_config=dict(image_size=224, patch_size=16, hidden_size=1280,
                           intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
                           projection_dim=1024),
    )
    c.prior = _fields(PriorConfig.paper())
    c.decoder = _fields(paper_decoder_config())
    c.sr = [_fields(paper_sr1_config()), _fields(paper_sr2_config())]

    c.diffusion = ml_collections.ConfigDict()
    c.diffusion.prior = dict(steps=1000, schedule="cosine", model_output="x0",
                             model_var_type="fixed_small", sample_steps="64", sampler="ddpm",
                             guidance=4.0, num_candidates=2, cfg_drop_text=0.1)
    c.diffusion.decoder = dict(steps=1000, schedule="cosine", model_output="eps",
                               model_var_type="learned_range", sample_steps="250", sampler="ddpm",
                               guidance=3.0, cfg_drop_clip=0.1, cfg_drop_text=0.5)
    # One section for both upsamplers: the paper samples them with 27 and 15 respaced steps
    # (pass the 15 to the second stage at sampling time).
    c.diffusion.sr = dict(steps=1000, schedule="cosine", model_output="eps",
                          model_var_type="fixed_small", sample_steps="27", sampler="ddpm")

    # Training on a TPU pod slice: `unclip plan` compiles these steps for `tpu.topology` and
    # reports HBM / FLOPs per chip; launch_tpu.sh runs `unclip train <stage>` on all workers.
    c.tpu = dict(topology="v5p:4x4x8")      # v5p-256: 128 chips, 95 GiB HBM each

    def train(**kw):
        base = dict(batch_size=2048, learning_rate=1.2e-4, warmup_steps=10_000,
                    total_steps=800_000, weight_decay=0.0, grad_clip_norm=1.0, accum_steps=1,
                    ema_decay=0.9999, ema_warmup=False, save_every=5_000, keep_last=3,
                    log_every=100, max_nonfinite=10, seed=0, schedule="constant", b1=0.9,
                    b2=0.999, eps=1e-8, mesh=dict(data=-1, fsdp=16, tensor=1))
        base.update(kw)
        return base

    c.train = ml_collections.ConfigDict()
    c.train.prior = train(batch_size=4096, learning_rate=1.1e-4, total_steps=600_000, b2=0.96,
                          eps=1e-6, weight_decay=6.0e-2, mesh=dict(data=-1, fsdp=4, tensor=1))
    c.train.decoder = train(vlb_weight=0.001)
    # Upsampler 0 (64 -> 256): 64x64 crops, batch 1024, lr 1.2e-4, blurred low-res input. For
    # upsampler 1 (256 -> 1024) the paper uses 256x256 crops, batch 512, lr 1e-4 and BSR-style
    # degradation (corruption[1] = 'bsr': BSR-lite on the host, data/augment.py; options in an
    # optional train.sr.bsr dict): --set train.sr.index=1 --set train.sr.crop_size=256
    # --set train.sr.batch_size=512 --set train.sr.learning_rate=1e-4
    c.train.sr = train(batch_size=1024, total_steps=1_000_000, index=0, crop_size=64,
                       blur_sigma=(0.4, 0.6), blur_kernel=3, corruption=("blur", "bsr"),
                       mesh=dict(data=-1, fsdp=8, tensor=1))
    c.train.inpaint = train(vlb_weight=0.001, total_steps=100_000, init_from="",
                            mask_min_frac=0.25, mask_max_frac=0.75, mask_p_keep_all=0.0)
    return c
