"""CLIP in Flax: causal text transformer and ViT image tower with projection heads.

The parameter tree mirrors ``transformers.CLIPModel`` so that HF and OpenAI checkpoints convert by
name (``unclip_jax/convert/hf_clip.py``, ``unclip_jax/convert/openai_clip.py``)::

    text_model/   token_embedding/embedding [V, D], position_embedding [L, D],
                  encoder/layers_i/{ln1, attn/{query,key,value,out}, ln2, mlp/{fc1,fc2}},
                  final_layer_norm
    text_projection/dense/kernel [D, P]            (no bias)
    vision_model/ patch_embedding/kernel [p, p, C, Dv] (no bias), class_embedding [Dv],
                  position_embedding [N + 1, Dv], pre_layernorm, encoder/layers_i/..., post_layernorm
    visual_projection/dense/kernel [Dv, P]         (no bias)
    logit_scale   []  (log of the contrastive temperature multiplier, as stored by HF / OpenAI)

``encode_text`` / ``encode_image`` return the projected, *unnormalised* embeddings (Karlo and
diffusers condition on those). Images are NHWC, already CLIP-normalised
(``unclip_jax/data/clip_preprocess.py``). Every parameter carries logical axis names.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from unclip_jax.models.layers import (
    Dense,
    LayerNorm,
    Transformer,
    causal_mask,
    partitioned,
)

Array = jax.Array
Dtype = Any

# HF activation names -> names in unclip_jax.models.layers.ACTIVATIONS
_HF_ACTIVATIONS = {
    "quick_gelu": "quick_gelu",
    "gelu": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "relu": "relu",
    "silu": "silu",
    "swish": "silu",
}

_POOLINGS = ("auto", "argmax", "eos")


# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    """Mirrors ``transformers.CLIPTextConfig`` (same field names and defaults).

    ``pooling`` is ours: how the pooled (EOT) state is picked. ``'auto'`` follows HF: argmax of the
    token ids when ``eos_token_id == 2`` (legacy configs), else the first position holding
    ``eos_token_id``. ``'argmax'`` is OpenAI CLIP's rule (EOT is the highest id); ``'eos'`` always
    takes the first ``eos_token_id``.
    """

    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    projection_dim: int = 512
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    pad_token_id: int = 1
    bos_token_id: int = 49406
    eos_token_id: int = 49407
    pooling: str = "auto"

    def __post_init__(self):
        if self.pooling not in _POOLINGS:
            raise ValueError(f"pooling must be one of {_POOLINGS}, got {self.pooling!r}")
        _activation(self.hidden_act)
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"text hidden_size {self.hidden_size} not divisible by "
                             f"num_attention_heads {self.num_attention_heads}")


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
    """Mirrors ``transformers.CLIPVisionConfig`` (same field names and defaults)."""

    hidden_size: int = 768
    intermediate_size: int = 3072
    projection_dim: int = 512
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 32
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5

    def __post_init__(self):
        _activation(self.hidden_act)
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} not divisible by patch_size {self.patch_size}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"vision hidden_size {self.hidden_size} not divisible by "
                             f"num_attention_heads {self.num_attention_heads}")

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
    """Mirrors ``transformers.CLIPConfig``: a text and a vision config, the shared projection width
    and the initial (log) logit scale. ``logit_scale_init_value`` only seeds training; converted
    checkpoints carry their own ``logit_scale``."""

    text_config: CLIPTextConfig = dataclasses.field(default_factory=CLIPTextConfig)
    vision_config: CLIPVisionConfig = dataclasses.field(default_factory=CLIPVisionConfig)
    projection_dim: int = 512
    logit_scale_init_value: float = 2.6592

    # -- (de)serialisation ----------------------------------------------------------------
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "CLIPConfig":
        d = dict(d)
        text = _filter_fields(CLIPTextConfig, d.pop("text_config", None) or {})
        vision = _filter_fields(CLIPVisionConfig, d.pop("vision_config", None) or {})
        top = _filter_fields(cls, d)
        top.pop("text_config", None)
        top.pop("vision_config", None)
        return cls(text_config=CLIPTextConfig(**text), vision_config=CLIPVisionConfig(**vision), **top)

    @classmethod
    def from_hf(cls, hf_config: Any) -> "CLIPConfig":
        """From a ``transformers`` ``CLIPConfig``, ``CLIPTextConfig`` or ``CLIPVisionConfig`` (or
        the dict of a ``config.json``). A text-only / vision-only config gives default values for
        the other tower (whose parameters the converter then leaves out)."""
        d = hf_config if isinstance(hf_config, Mapping) else hf_config.to_dict()
        d = dict(d)
        model_type = d.get("model_type", "clip")
        if model_type == "clip_text_model":
            text = _filter_fields(CLIPTextConfig, d)
            proj = d.get("projection_dim", CLIPTextConfig.projection_dim)
            return cls(text_config=CLIPTextConfig(**text),
                       vision_config=CLIPVisionConfig(projection_dim=proj), projection_dim=proj)
        if model_type == "clip_vision_model":
            vision = _filter_fields(CLIPVisionConfig, d)
            proj = d.get("projection_dim", CLIPVisionConfig.projection_dim)
            return cls(text_config=CLIPTextConfig(projection_dim=proj),
                       vision_config=CLIPVisionConfig(**vision), projection_dim=proj)
        if model_type != "clip":
            raise ValueError(f"not a CLIP config: model_type={model_type!r}")
        return cls.from_dict(d)


def _filter_fields(cls, d: Mapping[str, Any]) -> dict:
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in d.items() if k in names}


def _activation(hf_name: str) -> str:
    if hf_name not in _HF_ACTIVATIONS:
        raise ValueError(f"unsupported CLIP hidden_act {hf_name!r}; known: {sorted(_HF_ACTIVATIONS)}")
    return _HF_ACTIVATIONS[hf_name]


# --------------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------------
class CLIPTextTransformer(nn.Module):
    """Causal text transformer (no projection).

    ``__call__(input_ids [B, L] int, attention_mask [B, L] | None) -> (states [B, L, D], pooled [B, D])``
    where ``states`` is the last hidden state after the final LayerNorm and ``pooled`` its row at
    the EOT token (see ``CLIPTextConfig.pooling``). ``attention_mask`` (1 = token, 0 = padding)
    masks padded keys on top of the causal mask, as HF does; OpenAI CLIP passes none.
    """

    config: CLIPTextConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, input_ids: Array, attention_mask: Optional[Array] = None):
        cfg = self.config
        batch, length = input_ids.shape
        if length > cfg.max_position_embeddings:
            raise ValueError(f"sequence length {length} > max_position_embeddings "
                             f"{cfg.max_position_embeddings}")
        init = nn.initializers.normal(0.02)
        tok = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype,
                       embedding_init=partitioned(init, ("vocab", "embed")), name="token_embedding")
        pos = self.param("position_embedding", partitioned(nn.initializers.normal(0.01), ("length", "embed")),
                         (cfg.max_position_embeddings, cfg.hidden_size), self.param_dtype)
        x = tok(input_ids) + jnp.asarray(pos[:length], self.dtype)[None]

        mask = causal_mask(length)
        if attention_mask is not None:
            mask = jnp.logical_and(mask, jnp.asarray(attention_mask, bool)[:, None, None, :])
        x = Transformer(cfg.num_hidden_layers, cfg.num_attention_heads,
                        activation=_activation(cfg.hidden_act), ln_epsilon=cfg.layer_norm_eps,
                        mlp_dim=cfg.intermediate_size, dtype=self.dtype,
                        param_dtype=self.param_dtype, name="encoder")(x, mask)
        states = LayerNorm(cfg.layer_norm_eps, dtype=self.dtype, param_dtype=self.param_dtype,
                           name="final_layer_norm")(x)
        index = eot_index(input_ids, cfg)
        pooled = jnp.take_along_axis(states, index[:, None, None], axis=1)[:, 0]
        return states, pooled


def eot_index(input_ids: Array, config: CLIPTextConfig) -> Array:
    """``[B]`` position of the pooled (EOT) token, following ``config.pooling`` (HF's rule)."""
    pooling = config.pooling
    if pooling == "auto":
        pooling = "argmax" if config.eos_token_id == 2 else "eos"
    ids = jnp.asarray(input_ids, jnp.int32)
    if pooling == "argmax":
        return jnp.argmax(ids, axis=-1)
    return jnp.argmax((ids == config.eos_token_id).astype(jnp.int32), axis=-1)


class CLIPVisionTransformer(nn.Module):
    """ViT image tower (no projection).

    ``__call__(pixel_values [B, H, W, C] NHWC, CLIP-normalised) -> (states [B, N + 1, D], pooled [B, D])``:
    patchify conv (no bias), class token, positional embedding, pre-LN, encoder; ``states`` is the
    encoder output (not post-normed, as in HF), ``pooled`` the post-LN class token.
    """

    config: CLIPVisionConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, pixel_values: Array):
        cfg = self.config
        b, h, w, c = pixel_values.shape
        if (h, w, c) != (cfg.image_size, cfg.image_size, cfg.num_channels):
            raise ValueError(f"expected images [B, {cfg.image_size}, {cfg.image_size}, "
                             f"{cfg.num_channels}] (NHWC), got {pixel_values.shape}")
        d = cfg.hidden_size
        p = cfg.patch_size
        x = nn.Conv(d, (p, p), strides=(p, p), padding="VALID", use_bias=False, dtype=self.dtype,
                    param_dtype=self.param_dtype,
                    kernel_init=partitioned(nn.initializers.lecun_normal(),
                                            ("spatial", "spatial", "null", "embed")),
                    name="patch_embedding")(jnp.asarray(pixel_values, self.dtype))
        x = x.reshape(b, -1, d)  # row-major over the patch grid, as HF's flatten(2)
        cls = self.param("class_embedding", partitioned(nn.initializers.normal(d ** -0.5), ("embed",)),
                         (d,), self.param_dtype)
        pos = self.param("position_embedding", partitioned(nn.initializers.normal(0.02), ("length", "embed")),
                         (cfg.num_patches + 1, d), self.param_dtype)
        cls = jnp.broadcast_to(jnp.asarray(cls, self.dtype)[None, None], (b, 1, d))
        x = jnp.concatenate([cls, x], axis=1) + jnp.asarray(pos, self.dtype)[None]
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = LayerNorm(cfg.layer_norm_eps, name="pre_layernorm", **kw)(x)
        x = Transformer(cfg.num_hidden_layers, cfg.num_attention_heads,
                        activation=_activation(cfg.hidden_act), ln_epsilon=cfg.layer_norm_eps,
                        mlp_dim=cfg.intermediate_size, name="encoder", **kw)(x)
        pooled = LayerNorm(cfg.layer_norm_eps, name="post_layernorm", **kw)(x[:, 0])
        return x, pooled


class CLIP(nn.Module):
    """CLIP text + image towers, projections and logit scale.

    ``__call__(input_ids=None, pixel_values=None, attention_mask=None) -> dict`` runs whichever
    towers get inputs:

    * text: ``text_embeds [B, P]`` (projected, unnormalised), ``text_states [B, L, D]`` (last hidden
      state after the final LN; the decoder's caption tokens), ``text_pooled [B, D]``;
    * image: ``image_embeds [B, P]``, ``image_states [B, N + 1, Dv]``, ``image_pooled [B, Dv]``;
    * ``logit_scale`` (the multiplier ``exp(log scale)``) when both towers run, or neither.

    Only the parameters of what runs are created / read, so a text-only or vision-only parameter
    tree (``CLIPTextModelWithProjection`` / ``CLIPVisionModelWithProjection``) works with the
    matching methods: ``encode_text``, ``text_states``, ``encode_text_and_states``,
    ``encode_image``, ``logit_scale``.
    """

    config: CLIPConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, input_ids: Optional[Array] = None, pixel_values: Optional[Array] = None,
                 attention_mask: Optional[Array] = None, *, project: bool = True) -> dict:
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        out = {}
        if input_ids is not None:
            states, pooled = CLIPTextTransformer(cfg.text_config, name="text_model", **kw)(
                input_ids, attention_mask)
            out.update(text_states=states, text_pooled=pooled)
            if project:
                out["text_embeds"] = Dense(cfg.projection_dim, ("embed", "mlp"), use_bias=False,
                                           name="text_projection", **kw)(pooled)
        if pixel_values is not None:
            states, pooled = CLIPVisionTransformer(cfg.vision_config, name="vision_model", **kw)(
                pixel_values)
            out.update(image_states=states, image_pooled=pooled)
            if project:
                out["image_embeds"] = Dense(cfg.projection_dim, ("embed", "mlp"), use_bias=False,
                                            name="visual_projection", **kw)(pooled)
        if (input_ids is None) == (pixel_values is None):
            log_scale = self.param(
                "logit_scale",
                partitioned(nn.initializers.constant(cfg.logit_scale_init_value), ()),
                (), self.param_dtype)
            out["logit_scale"] = jnp.exp(jnp.asarray(log_scale, jnp.float32))
        return out

    def encode_text(self, input_ids: Array, attention_mask: Optional[Array] = None) -> Array:
        """``[B, L]`` token ids -> ``[B, P]`` projected, unnormalised text embeddings."""
        return self(input_ids=input_ids, attention_mask=attention_mask)["text_embeds"]

    def text_states(self, input_ids: Array, attention_mask: Optional[Array] = None) -> Array:
        """``[B, L]`` token ids -> ``[B, L, D]`` last hidden state after the final LayerNorm."""
        return self(input_ids=input_ids, attention_mask=attention_mask, project=False)["text_states"]

    def encode_text_and_states(self, input_ids: Array, attention_mask: Optional[Array] = None):
        """``[B, L]`` -> ``(embeds [B, P], states [B, L, D])`` in one pass."""
        out = self(input_ids=input_ids, attention_mask=attention_mask)
        return out["text_embeds"], out["text_states"]

    def encode_image(self, pixel_values: Array) -> Array:
        """``[B, H, W, 3]`` CLIP-normalised NHWC images -> ``[B, P]`` unnormalised embeddings."""
        return self(pixel_values=pixel_values)["image_embeds"]

    def logit_scale(self) -> Array:
        """The contrastive logit multiplier ``exp(logit_scale)`` (scalar, fp32)."""
        return self()["logit_scale"]


def normalize(x: Array, eps: float = 1e-12) -> Array:
    """L2-normalise the last axis (for similarities; embeddings are returned unnormalised)."""
    x = jnp.asarray(x, jnp.float32)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


def clip_logits(text_embeds: Array, image_embeds: Array, logit_scale: Array):
    """``(logits_per_text [Bt, Bi], logits_per_image [Bi, Bt])`` as ``CLIPModel`` computes them."""
    t, i = normalize(text_embeds), normalize(image_embeds)
    logits_per_text = logit_scale * t @ i.T
    return logits_per_text, logits_per_text.T


def contrastive_loss(text_embeds: Array, image_embeds: Array, logit_scale: Array) -> Array:
    """CLIP's symmetric InfoNCE loss for matched pairs ``text_embeds [B, P]`` / ``image_embeds
    [B, P]`` (row i matches row i); ``logit_scale`` is the multiplier ``exp(log scale)`` that
    ``CLIP.__call__`` returns. Mean of the text->image and image->text cross-entropies (fp32)."""
    logits_per_text, logits_per_image = clip_logits(text_embeds, image_embeds, logit_scale)
    labels = jnp.arange(logits_per_text.shape[0])

    def ce(logits):
        logp = jax.nn.log_softmax(logits, axis=-1)
        return -jnp.mean(jnp.take_along_axis(logp, labels[:, None], axis=-1))

    return 0.5 * (ce(logits_per_text) + ce(logits_per_image))


def init_params(config: CLIPConfig, rng: Optional[Array] = None, *, text: bool = True,
                vision: bool = True, batch: int = 1, dtype: Dtype = jnp.float32,
                param_dtype: Dtype = jnp.float32, abstract: bool = False):
    """Initialise (or with ``abstract=True`` only shape-evaluate) the boxed ``params`` collection
    for the chosen towers. Returns the ``nn.Partitioned``-boxed dict under ``'params'``."""
    model = CLIP(config, dtype=dtype, param_dtype=param_dtype)
    rng = jax.random.PRNGKey(0) if rng is None else rng
    ids = (jnp.zeros((batch, config.text_config.max_position_embeddings), jnp.int32)
           if text else None)
    v = config.vision_config
    pix = (jnp.zeros((batch, v.image_size, v.image_size, v.num_channels), jnp.float32)
           if vision else None)

    def f(r):
        return model.init(r, input_ids=ids, pixel_values=pix)["params"]

    return jax.eval_shape(f, rng) if abstract else jax.jit(f)(rng)


__all__ = [
    "CLIP", "CLIPConfig", "CLIPTextConfig", "CLIPVisionConfig", "CLIPTextTransformer",
    "CLIPVisionTransformer", "eot_index", "normalize",
    "clip_logits", "contrastive_loss", "init_params",
]
