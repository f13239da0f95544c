"""Shared helpers for the CLIP tests: tiny configs, a random HF CLIPModel, token batches."""
from __future__ import annotations

import numpy as np

TEXT = dict(vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=16, projection_dim=24,
            eos_token_id=98, bos_token_id=97, pad_token_id=0, hidden_act="quick_gelu")
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              image_size=32, patch_size=8, projection_dim=24, hidden_act="quick_gelu")


def hf_clip_model(text=None, vision=None, projection_dim=24, seed=0, logit_scale=2.0):
    """A random ``transformers.CLIPModel`` (eval mode, fp32) with tiny towers."""
    import torch
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(seed)
    cfg = CLIPConfig(text_config=dict(TEXT, **(text or {})),
                     vision_config=dict(VISION, **(vision or {})),
                     projection_dim=projection_dim)
    model = CLIPModel(cfg).eval()
    with torch.no_grad():  # make every parameter non-trivial (LN scales/biases are 1/0 at init)
        for name, p in model.named_parameters():
            if name == "logit_scale":
                p.fill_(logit_scale)
            elif "layer_norm" in name or "layrnorm" in name or "layernorm" in name:
                p.add_(0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.05 * torch.randn_like(p))
    return model


def token_batch(rng: np.random.Generator, batch: int, length: int, vocab: int, bos: int, eos: int,
                pad: int = 0):
    """Random CLIP-like rows: bos, words, eos, then padding; returns (ids, mask) int64."""
    ids = np.full((batch, length), pad, np.int64)
    mask = np.zeros((batch, length), np.int64)
    for b in range(batch):
        n = int(rng.integers(1, length - 1))  # words
        ids[b, 0] = bos
        ids[b, 1:n + 1] = rng.integers(1, min(bos, eos), n)
        ids[b, n + 1] = eos
        mask[b, :n + 2] = 1
    return ids, mask
