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
eps, weight decay); EMA decay 0.9999; warmup is ours.
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

    c.train = ml_collections.ConfigDict()
    c.train.topology = "v5p:4x4x8"          # v5p-256: 128 chips, 95 GiB HBM each
    c.train.mesh = dict(data=-1, fsdp=16, tensor=1)
    c.train.ema_decay = 0.9999
    c.train.prior = dict(
        batch_size=4096, num_steps=600_000, mesh=dict(data=-1, fsdp=4, tensor=1),
        optimizer=dict(learning_rate=1.1e-4, schedule="constant", warmup_steps=10_000,
                       total_steps=600_000, b2=0.96, eps=1e-6, weight_decay=6.0e-2))
    c.train.decoder = dict(
        batch_size=2048, num_steps=800_000, mesh=dict(data=-1, fsdp=16, tensor=1),
        optimizer=dict(learning_rate=1.2e-4, schedule="constant", warmup_steps=10_000,
                       total_steps=800_000, b2=0.999, eps=1e-8, weight_decay=0.0))
    c.train.sr = [
        dict(batch_size=1024, num_steps=1_000_000, train_size=64,  # 64x64 crops of 256x256
             mesh=dict(data=-1, fsdp=8, tensor=1),
             optimizer=dict(learning_rate=1.2e-4, schedule="constant", warmup_steps=10_000,
                            total_steps=1_000_000, b2=0.999, eps=1e-8, weight_decay=0.0)),
        dict(batch_size=512, num_steps=1_000_000, train_size=256,  # 256x256 crops of 1024
             mesh=dict(data=-1, fsdp=8, tensor=1),
             optimizer=dict(learning_rate=1.0e-4, schedule="constant", warmup_steps=10_000,
                            total_steps=1_000_000, b2=0.999, eps=1e-8, weight_decay=0.0)),
    ]
    return c
