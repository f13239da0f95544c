"""Decoder conditioning: CLIP image embedding and caption -> time-embedding terms + context tokens.

The unCLIP decoder (a GLIDE UNet) sees two conditions:

* the CLIP **image** embedding ``[B, clip_dim]``: projected and *added to the timestep embedding*
  (``ClipEmbConditioning.to_time``) and projected into ``clip_emb_mult`` (4) extra *context
  tokens* ``[B, 4, context_dim]`` (``ClipEmbConditioning.to_tokens``);
* the **caption**: a sequence of context tokens ``[B, L, context_dim]`` that every attention block
  of the UNet sees as extra keys / values, plus a pooled vector added to the timestep embedding.
  Two flavours:
  - ``ClipCaptionConditioning`` (Karlo / diffusers): the caller passes CLIP's text token states
    ``[B, L, text_states_dim]`` (projected + layer-normed) and the pooled, projected CLIP text
    embedding ``[B, text_emb_dim]`` (projected into the time embedding, diffusers'
    ``embedding_proj``).
  - ``CaptionTransformer`` (GLIDE / the paper's decoder): token ids ``[B, L]`` -> token +
    positional (+ padding) embeddings -> bidirectional transformer -> final LN; the state at the
    last position is projected into the time embedding.

Classifier-free guidance: ``draw_cfg_drop_masks`` draws the boolean drop masks; a dropped CLIP
embedding is replaced by a learned null embedding (Karlo's ``cf_param``), a dropped caption by an
empty caption (all tokens masked out of attention, pooled text embedding zeroed; for the caption
transformer, all positions become padding). Karlo / diffusers at sampling time instead feed the
CLIP encoding of the empty string as the unconditional caption; the modules accept that too
(just pass those arrays with ``drop_text=False``).

Converter notes (Karlo ``PLMImUNet`` -> these modules; torch ``Linear.weight`` is ``[out, in]``,
our ``kernel`` is ``[in, out]``, so kernels are transposed):

* ``clip_emb``          -> ``ClipEmbConditioning/to_time``
* ``clip_tok_proj``     -> ``ClipEmbConditioning/to_tokens``. TRAP: Karlo reshapes the
  ``[B, context_dim * 4]`` output to ``[B, context_dim, 4]`` (channel-major: output unit
  ``c * 4 + j`` is channel ``c`` of token ``j``). We reshape to ``[B, 4, context_dim]``
  (token-major: unit ``j * context_dim + c``). The converter must permute the output units:
  ``ours[:, j*D + c] = karlo.T[:, c*4 + j]`` (i.e. ``k.reshape(in, D, 4).transpose(0, 2, 1)
  .reshape(in, 4*D)``; same for the bias). diffusers' ``clip_extra_context_tokens_proj`` keeps
  Karlo's order (it reshapes to ``[B, -1, 4]`` and permutes), so the same permutation applies.
* ``cf_param``          -> ``ClipEmbConditioning/null_emb``
  (diffusers ``learned_classifier_free_guidance_embeddings``)
* ``text_seq_proj.0/.1`` -> ``ClipCaptionConditioning/states_proj`` / ``states_norm``
  (diffusers ``encoder_hidden_states_proj`` / ``text_encoder_hidden_states_norm``)
* ``text_feat_proj``    -> ``ClipCaptionConditioning/to_time`` (diffusers ``embedding_proj``)
* Context order: Karlo puts the 4 CLIP tokens *before* the caption tokens (mask padded with True
  in front); so do we.
"""
from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from unclip_jax.models.layers import Dense, LayerNorm, Transformer, partitioned

Array = jax.Array
Dtype = Any


def draw_cfg_drop_masks(
    key: Array, batch_size: int, p_clip: float = 0.1, p_text: float = 0.5
) -> tuple[Array, Array]:
    """Draw independent classifier-free-guidance drop masks.

    Args:
      key: PRNG key.
      batch_size: ``B``.
      p_clip: probability of dropping the CLIP image embedding (paper 10%, Karlo 10%).
      p_text: probability of dropping the caption (paper 50%, Karlo 30%).
    Returns:
      ``(drop_clip [B] bool, drop_text [B] bool)``; True = replace by the null condition.
    """
    k_clip, k_text = jax.random.split(key)
    drop_clip = jax.random.uniform(k_clip, (batch_size,)) < p_clip
    drop_text = jax.random.uniform(k_text, (batch_size,)) < p_text
    return drop_clip, drop_text


def apply_text_drop(
    text_mask: Optional[Array], drop_text: Optional[Array], batch_size: int, length: int
) -> Array:
    """Caption mask ``[B, L]`` (True = real token) with dropped rows fully masked out."""
    mask = jnp.ones((batch_size, length), bool) if text_mask is None else text_mask.astype(bool)
    if drop_text is not None:
        mask = jnp.logical_and(mask, jnp.logical_not(drop_text.astype(bool))[:, None])
    return mask


class ClipEmbConditioning(nn.Module):
    """CLIP image embedding -> (time-embedding term, ``num_tokens`` context tokens).

    ``__call__(clip_emb [B, clip_dim], drop [B] bool | None) ->
    (time_term [B, time_dim], tokens [B, num_tokens, context_dim] | None)``.

    Rows with ``drop`` True use the learned ``null_emb [clip_dim]`` instead of ``clip_emb``.
    ``context_dim == 0`` skips the tokens (a UNet without attention context).
    """

    clip_dim: int
    time_dim: int
    context_dim: int
    num_tokens: int = 4
    use_null: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        if self.use_null:
            self.null_emb = self.param(
                "null_emb",
                partitioned(nn.initializers.normal(1.0), ("null",)),
                (self.clip_dim,),
                self.param_dtype,
            )
        self.to_time = Dense(self.time_dim, ("embed", "mlp"), **kw)
        if self.context_dim:
            self.to_tokens = Dense(self.context_dim * self.num_tokens, ("embed", "mlp"), **kw)

    def substitute_null(self, clip_emb: Array, drop: Optional[Array]) -> Array:
        """``clip_emb [B, clip_dim]`` with dropped rows replaced by the learned null embedding."""
        if drop is None:
            return clip_emb
        if not self.use_null:
            raise ValueError("drop_clip given but the model has no learned null embedding")
        null = jnp.asarray(self.null_emb, clip_emb.dtype)[None]
        return jnp.where(drop.astype(bool)[:, None], null, clip_emb)

    def __call__(self, clip_emb: Array, drop: Optional[Array] = None):
        clip_emb = self.substitute_null(clip_emb, drop)
        time_term = self.to_time(clip_emb)
        tokens = None
        if self.context_dim:
            b = clip_emb.shape[0]
            # token-major [B, T, D]; Karlo's layout is channel-major (see module docstring).
            tokens = self.to_tokens(clip_emb).reshape(b, self.num_tokens, self.context_dim)
        return time_term, tokens


class ClipCaptionConditioning(nn.Module):
    """Karlo-style caption: CLIP text token states + pooled CLIP text embedding.

    ``__call__(text_states [B, L, text_states_dim] | None, text_emb [B, text_emb_dim] | None,
    drop [B] bool | None) -> (time_term [B, time_dim] | None, tokens [B, L, context_dim] | None)``.

    Rows with ``drop`` True get a zero pooled embedding (the caller also masks their tokens, see
    ``apply_text_drop``).
    """

    text_states_dim: int
    text_emb_dim: int
    time_dim: int
    context_dim: int
    ln_epsilon: float = 1e-5
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, text_states=None, text_emb=None, drop=None):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        # Create every parameter even when an input is missing, so the structure is fixed.
        states_proj = Dense(self.context_dim, ("embed", "mlp"), name="states_proj", **kw)
        states_norm = LayerNorm(self.ln_epsilon, name="states_norm", **kw)
        to_time = Dense(self.time_dim, ("embed", "mlp"), name="to_time", **kw)
        if self.is_initializing():
            b = 1 if text_states is None and text_emb is None else (
                text_states.shape[0] if text_states is not None else text_emb.shape[0])
            if text_states is None:
                states_norm(states_proj(jnp.zeros((b, 1, self.text_states_dim), self.dtype)))
            if text_emb is None:
                to_time(jnp.zeros((b, self.text_emb_dim), self.dtype))
        tokens = None
        if text_states is not None:
            tokens = states_norm(states_proj(text_states))
        time_term = None
        if text_emb is not None:
            if drop is not None:
                text_emb = jnp.where(drop.astype(bool)[:, None], 0.0, text_emb).astype(
                    text_emb.dtype)
            time_term = to_time(text_emb)
        return time_term, tokens


class CaptionTransformer(nn.Module):
    """GLIDE-style caption encoder (the paper's decoder text encoder).

    ``__call__(tokens [B, L] int, mask [B, L] bool | None) ->
    (time_term [B, time_dim], states [B, L, width])``.

    Token + positional embeddings; with ``padding``, masked positions are replaced by a learned
    per-position padding embedding (GLIDE ``xf_padding``); a bidirectional pre-LN transformer;
    optional final LN; the state at the last position is projected to ``time_dim``
    (GLIDE ``transformer_proj``). Parameters: ``token_embedding [vocab, width]``,
    ``positional_embedding [L, width]``, ``padding_embedding [L, width]``, ``transformer``,
    ``final_ln``, ``to_time``.
    """

    vocab_size: int
    text_ctx: int
    width: int
    layers: int
    heads: int
    time_dim: int
    final_ln: bool = True
    padding: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, tokens: Array, mask: Optional[Array] = None):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        emb_init = nn.initializers.normal(0.01)
        table = self.param("token_embedding", partitioned(emb_init, ("vocab", "embed")),
                           (self.vocab_size, self.width), self.param_dtype)
        pos = self.param("positional_embedding", partitioned(emb_init, ("length", "embed")),
                         (self.text_ctx, self.width), self.param_dtype)
        length = tokens.shape[1]
        x = jnp.take(table, tokens, axis=0) + pos[None, :length]
        if self.padding:
            pad = self.param("padding_embedding", partitioned(emb_init, ("length", "embed")),
                             (self.text_ctx, self.width), self.param_dtype)
            if mask is not None:
                x = jnp.where(mask[..., None], x, pad[None, :length])
        x = x.astype(self.dtype)
        x = Transformer(self.layers, self.heads, name="transformer", **kw)(x, None)
        if self.final_ln:
            x = LayerNorm(name="final_ln", **kw)(x)
        time_term = Dense(self.time_dim, ("embed", "mlp"), name="to_time", **kw)(x[:, -1])
        return time_term, x
