"""diffusers unCLIP (``UnCLIPPipeline.save_pretrained``) -> an unclip_jax model dir.

Components (sub-folders of a saved pipeline) and where they go:

  prior/            ``PriorTransformer``            -> ``params['prior']`` ({'params','buffers'})
  text_proj/        ``UnCLIPTextProjModel``         -> decoder ``clip_cond/*``, ``caption/*``
  decoder/          ``UNet2DConditionModel``        -> ``params['decoder']``
  super_res_first/  ``UNet2DModel``                 -> ``params['sr'][0]`` (SR steps but the last)
  super_res_last/   ``UNet2DModel``                 -> ``params['sr_last']['0']`` (the last SR step)
  text_encoder/     ``CLIPTextModelWithProjection`` -> ``params['clip']`` (text tower)
  image_encoder/    ``CLIPVisionModelWithProjection`` (``UnCLIPImageVariationPipeline``) or
                    ``--clip DIR`` (HF / OpenAI CLIP) -> ``params['clip']`` (vision tower)
  tokenizer/        copied into the model dir
  *_scheduler/      ``UnCLIPScheduler`` -> ``config.diffusion`` (cosine = squaredcos_cap_v2,
                    'fixed_small_log' = our 'fixed_small', 'learned_range'; prediction 'sample'
                    = our 'x0'; the prior's ``clip_sample_range`` -> ``diffusion.prior.clip_range``)

Strict key accounting (as ``hf_clip``): every checkpoint tensor is consumed exactly once, every
one of our parameters is assigned exactly once with the expected shape, and unknown / missing
keys, shape mismatches and non-float tensors raise ``CheckpointMismatchError`` naming them.
fp16 / bf16 tensors are upcast to float32 (reported in ``ConversionReport.notes``).

Layout notes (see ``models/unet.py`` / ``models/conditioning.py`` / ``models/prior.py``):
  * torch conv ``[out, in, kh, kw]`` -> ``[kh, kw, in, out]``; linear ``[out, in]`` ->
    ``[in, out]``;
  * the UNet attention ``to_q/to_k/to_v`` are re-interleaved per head into our ``qkv`` (units
    ``(heads, 3, head_dim)``) and ``add_k_proj/add_v_proj`` into ``encoder_kv``
    (``(heads, 2, head_dim)``);
  * ``clip_extra_context_tokens_proj`` is channel-major (``[B, D, 4]`` after the reshape, as in
    Karlo): its output units are permuted to our token-major order.

Sampling differences that the converted config records (read by ``pipelines/stages.py``):
  * ``diffusion.prior.clip_range``: the prior's x0 is clipped to +-5 (diffusers; Karlo +-10);
  * ``diffusion.decoder.uncond_caption = 'empty'``: the decoder's unconditional half sees the
    CLIP encoding of the empty caption (not a masked-out caption);
  * ``sr_last_step = [0]``: upsampler 0 runs ``sr_last['0']`` for its last step (Karlo);
  * the upsampler resizes the decoder output with bicubic (a = -0.5, antialiased), as the
    diffusers pipeline's ``F.interpolate(..., 'bicubic', antialias=True)`` does.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable, Iterable, Mapping, Optional

import numpy as np

from unclip_jax.convert.hf_clip import CheckpointMismatchError, _to_numpy, flatten, unflatten  # noqa: F401

# ----------------------------------------------------------------------------- key accounting


@dataclasses.dataclass
class ConversionReport:
    """What a conversion did: tensors read, params written, notes (upcasts etc.)."""

    tensors: int = 0
    params: int = 0
    notes: list = dataclasses.field(default_factory=list)




class Mapper:
    """Moves tensors from a torch-style state dict (name -> array) into our flat param dict,
    checking that every source key is used once and every target is assigned once with the
    expected shape. ``finish()`` raises ``CheckpointMismatchError`` listing all problems."""

    def __init__(self, state_dict: Mapping[str, Any], expected: Mapping[tuple, tuple],
                 what: str, report: Optional[ConversionReport] = None,
                 ignore: Iterable[str] = ()):
        self.what = what
        self.report = report if report is not None else ConversionReport()
        self.sd = {}
        self.problems: list[str] = []
        for k, v in state_dict.items():
            if k in ignore:
                continue
            a = _to_numpy(v)
            if not np.issubdtype(a.dtype, np.floating):
                self.problems.append(f"{k}: dtype {a.dtype} is not floating point")
                continue
            if a.dtype != np.float32:
                self.report.notes.append(f"{what}: {k} {a.dtype} upcast to float32")
            self.sd[k] = a.astype(np.float32)
        self.expected = {tuple(p): tuple(s) for p, s in expected.items()}
        self.used: set = set()
        self.out: dict = {}

    def has(self, key: str) -> bool:
        return key in self.sd

    def get(self, key: str) -> Optional[np.ndarray]:
        if key not in self.sd:
            self.problems.append(f"missing checkpoint key {key}")
            return None
        if key in self.used:
            self.problems.append(f"checkpoint key {key} used twice")
        self.used.add(key)
        return self.sd[key]

    def put(self, path: tuple, value: Optional[np.ndarray], src: str = ""):
        if value is None:
            return
        path = tuple(path)
        name = "/".join(path)
        if path not in self.expected:
            self.problems.append(f"{src} -> {name}: no such parameter in our model")
            return
        if path in self.out:
            self.problems.append(f"{name} assigned twice (second time from {src})")
            return
        if tuple(value.shape) != self.expected[path]:
            self.problems.append(f"shape mismatch for {src}: gives {tuple(value.shape)}, "
                                 f"ours {name} is {self.expected[path]}")
            return
        self.out[path] = np.ascontiguousarray(value, np.float32)

    # -- common layer kinds (torch names -> ours)
    def linear(self, dst: tuple, src: str, inner: tuple = ("dense",)):
        w, b = self.get(src + ".weight"), self.get(src + ".bias")
        if w is not None:
            self.put(dst + inner + ("kernel",), w.reshape(w.shape[0], -1).T, src + ".weight")
        self.put(dst + inner + ("bias",), b, src + ".bias")

    def conv(self, dst: tuple, src: str):
        w, b = self.get(src + ".weight"), self.get(src + ".bias")
        if w is not None:
            if w.ndim != 4:
                self.problems.append(f"{src}.weight: expected a 4-D conv weight, got {w.shape}")
            else:
                self.put(dst + ("kernel",), w.transpose(2, 3, 1, 0), src + ".weight")
        self.put(dst + ("bias",), b, src + ".bias")

    def norm(self, dst: tuple, src: str, inner: tuple = ()):
        self.put(dst + inner + ("scale",), self.get(src + ".weight"), src + ".weight")
        self.put(dst + inner + ("bias",), self.get(src + ".bias"), src + ".bias")

    def finish(self) -> dict:
        problems = list(self.problems)
        unused = sorted(set(self.sd) - self.used)
        if unused:
            problems.append(f"unknown checkpoint keys ({len(unused)}): {unused}")
        unassigned = sorted("/".join(p) for p in set(self.expected) - set(self.out))
        if unassigned:
            problems.append(f"parameters left unassigned ({len(unassigned)}): {unassigned}")
        if problems:
            raise CheckpointMismatchError(f"{self.what} conversion failed:\n  "
                                          + "\n  ".join(problems))
        self.report.tensors += len(self.used)
        self.report.params += len(self.out)
        return unflatten(self.out)


def expected_shapes(abstract_tree) -> dict:
    import flax.linen as nn

    return {p: tuple(x.shape) for p, x in flatten(nn.meta.unbox(abstract_tree)).items()}


def permute_clip_tokens(kernel: np.ndarray, bias: np.ndarray, num_tokens: int):
    """Channel-major ``[in, D*T]`` (unit ``c*T + j``) -> token-major (unit ``j*D + c``)."""
    n_in, n_out = kernel.shape
    d = n_out // num_tokens
    k = kernel.reshape(n_in, d, num_tokens).transpose(0, 2, 1).reshape(n_in, n_out)
    return k, bias.reshape(d, num_tokens).T.reshape(n_out)


def interleave_heads(weights: list, biases: list, heads: int):
    """Separate torch projections ``[C, in]`` (q, k, v or k, v) -> one kernel ``[in, n*C]``
    whose units are laid out ``(heads, n, head_dim)``, and its bias."""
    n = len(weights)
    c, n_in = weights[0].shape
    dh = c // heads
    w = np.stack([x.reshape(heads, dh, n_in) for x in weights], axis=1)  # [H, n, dh, in]
    b = np.stack([x.reshape(heads, dh) for x in biases], axis=1)
    return w.reshape(n * c, n_in).T, b.reshape(n * c)


# ----------------------------------------------------------------------------- UNet walker


def unet_blocks(cfg) -> list[tuple[str, str, tuple]]:
    """Our UNet's block names in order, as ``(our name, kind, position)`` with kind in
    ``res | attn | down | up | middle_res_0 | middle_attn | middle_res_1`` and position
    ``(section, level, j)`` for diffusers-style names (section 'down' / 'up' / 'mid')."""
    n = cfg.num_res_blocks
    levels = len(cfg.channel_mult)
    out = []
    res, idx = cfg.image_size, 1
    for level in range(levels):
        for j in range(n):
            out.append((f"input_blocks_{idx}_res", "res", ("down", level, j, idx, 0)))
            if res in cfg.attention_resolutions:
                out.append((f"input_blocks_{idx}_attn", "attn", ("down", level, j, idx, 1)))
            idx += 1
        if level != levels - 1:
            out.append((f"input_blocks_{idx}_down", "down", ("down", level, 0, idx, 0)))
            res //= 2
            idx += 1
    out.append(("middle_res_0", "res", ("mid", 0, 0, 0, 0)))
    if cfg.use_middle_attention:
        out.append(("middle_attn", "attn", ("mid", 0, 0, 0, 1)))
    out.append(("middle_res_1", "res", ("mid", 0, 1, 0, 2 if cfg.use_middle_attention else 1)))
    idx = 0
    for u, level in enumerate(range(levels - 1, -1, -1)):
        for j in range(n + 1):
            has_attn = res in cfg.attention_resolutions
            out.append((f"output_blocks_{idx}_res", "res", ("up", u, j, idx, 0)))
            if has_attn:
                out.append((f"output_blocks_{idx}_attn", "attn", ("up", u, j, idx, 1)))
            if level and j == n:
                out.append((f"output_blocks_{idx}_up", "up",
                            ("up", u, 0, idx, 2 if has_attn else 1)))
                res *= 2
            idx += 1
    return out


def _diffusers_block_name(kind: str, pos: tuple) -> str:
    section, level, j = pos[:3]
    if section == "mid":
        if kind == "attn":
            return "mid_block.attentions.0"
        return f"mid_block.resnets.{j}"
    block = f"{section}_blocks.{level}"
    if kind == "res":
        return f"{block}.resnets.{j}"
    if kind == "attn":
        return f"{block}.attentions.{j}"
    return f"{block}.{'downsamplers' if kind == 'down' else 'upsamplers'}.0"


def _diffusers_res(m: Mapper, dst: tuple, src: str):
    m.norm(dst + ("in_norm",), src + ".norm1")
    m.conv(dst + ("in_conv",), src + ".conv1")
    m.linear(dst + ("emb_proj",), src + ".time_emb_proj")
    m.norm(dst + ("out_norm",), src + ".norm2")
    m.conv(dst + ("out_conv",), src + ".conv2")
    if m.has(src + ".conv_shortcut.weight"):
        m.conv(dst + ("skip",), src + ".conv_shortcut")


def _diffusers_attn(m: Mapper, dst: tuple, src: str, heads: int):
    m.norm(dst + ("norm",), src + ".group_norm")
    ws = [m.get(f"{src}.to_{p}.weight") for p in "qkv"]
    bs = [m.get(f"{src}.to_{p}.bias") for p in "qkv"]
    if all(x is not None for x in ws + bs):
        k, b = interleave_heads(ws, bs, heads)
        m.put(dst + ("qkv", "dense", "kernel"), k, src + ".to_q/k/v.weight")
        m.put(dst + ("qkv", "dense", "bias"), b, src + ".to_q/k/v.bias")
    if m.has(src + ".add_k_proj.weight"):
        ws = [m.get(f"{src}.add_{p}_proj.weight") for p in "kv"]
        bs = [m.get(f"{src}.add_{p}_proj.bias") for p in "kv"]
        if all(x is not None for x in ws + bs):
            k, b = interleave_heads(ws, bs, heads)
            m.put(dst + ("encoder_kv", "dense", "kernel"), k, src + ".add_k/v_proj.weight")
            m.put(dst + ("encoder_kv", "dense", "bias"), b, src + ".add_k/v_proj.bias")
    m.linear(dst + ("proj_out",), src + ".to_out.0")


def _heads_at(cfg, name: str) -> int:
    """Heads of the attention block ``name`` (from its channel count)."""
    import re

    levels = len(cfg.channel_mult)
    if name == "middle_attn":
        ch = cfg.model_channels * cfg.channel_mult[-1]
    else:
        m = re.match(r"(input|output)_blocks_(\d+)_attn", name)
        i = int(m.group(2))
        n = cfg.num_res_blocks
        if m.group(1) == "input":
            level = (i - 1) // (n + 1)
        else:
            level = levels - 1 - i // (n + 1)
        ch = cfg.model_channels * cfg.channel_mult[level]
    return ch // cfg.num_head_channels if cfg.num_head_channels > 0 else cfg.num_heads


def convert_diffusers_unet(state_dict: Mapping[str, Any], cfg, *,
                           text_proj: Optional[Mapping] = None,
                           what: str = "diffusers UNet",
                           report: Optional[ConversionReport] = None) -> dict:
    """diffusers ``UNet2DConditionModel`` (+ ``UnCLIPTextProjModel`` state dict) or
    ``UNet2DModel`` -> our UNet params for ``cfg`` (``UNetConfig``)."""
    from unclip_jax.models.unet import abstract_params

    sd = {f"unet.{k}": v for k, v in state_dict.items()}
    if text_proj is not None:
        sd.update({f"text_proj.{k}": v for k, v in text_proj.items()})
    m = Mapper(sd, expected_shapes(abstract_params(cfg)), what, report)
    m.linear(("time_embed_0",), "unet.time_embedding.linear_1")
    m.linear(("time_embed_1",), "unet.time_embedding.linear_2")
    m.conv(("conv_in",), "unet.conv_in")
    for name, kind, pos in unet_blocks(cfg):
        src = "unet." + _diffusers_block_name(kind, pos)
        if kind == "attn":
            _diffusers_attn(m, (name,), src, _heads_at(cfg, name))
        elif kind in ("down", "up") and not cfg.resblock_updown:
            m.conv((name, "op" if kind == "down" else "conv"), src + ".conv")
        else:
            _diffusers_res(m, (name,), src)
    m.norm(("out_norm",), "unet.conv_norm_out")
    m.conv(("out_conv",), "unet.conv_out")
    if cfg.clip_dim:
        if text_proj is None:
            m.problems.append("a CLIP-conditioned decoder needs the text_proj state dict")
        else:
            t = "text_proj."
            m.linear(("clip_cond", "to_time"),
                     t + "clip_image_embeddings_project_to_time_embeddings")
            w = m.get(t + "clip_extra_context_tokens_proj.weight")
            b = m.get(t + "clip_extra_context_tokens_proj.bias")
            if w is not None and b is not None:
                k, b = permute_clip_tokens(w.T, b, cfg.clip_emb_mult)
                m.put(("clip_cond", "to_tokens", "dense", "kernel"), k,
                      t + "clip_extra_context_tokens_proj.weight")
                m.put(("clip_cond", "to_tokens", "dense", "bias"), b,
                      t + "clip_extra_context_tokens_proj.bias")
            null = t + "learned_classifier_free_guidance_embeddings"
            m.put(("clip_cond", "null_emb"), m.get(null), null)
            m.linear(("caption", "states_proj"), t + "encoder_hidden_states_proj")
            m.norm(("caption", "states_norm"), t + "text_encoder_hidden_states_norm", ("ln",))
            m.linear(("caption", "to_time"), t + "embedding_proj")
    return m.finish()


# ----------------------------------------------------------------------------- prior


def prior_from_sd(state_dict: Mapping[str, Any], cfg, names: Mapping[str, str], *,
                  fused_qkv: bool, what: str, report: Optional[ConversionReport] = None,
                  stats: Optional[tuple] = None) -> tuple[dict, dict]:
    """Shared prior mapping (diffusers / Karlo). ``names``: our role -> source key prefix.
    Returns ``(params, {'clip_mean', 'clip_std'})``."""
    import jax

    from unclip_jax.models.prior import init_prior

    abstract = jax.eval_shape(lambda k: init_prior(cfg, k), jax.random.PRNGKey(0))
    m = Mapper(state_dict, expected_shapes(abstract["params"]), what, report)
    h, w = cfg.num_heads, cfg.width
    dh = w // h
    m.linear(("time_embed", "fc1"), names["time1"])
    m.linear(("time_embed", "fc2"), names["time2"])
    m.linear(("clip_img_proj",), names["clip_img_proj"])
    m.linear(("text_emb_proj",), names["text_emb_proj"])
    m.linear(("text_enc_proj",), names["text_enc_proj"])
    pos, prd = m.get(names["pos"]), m.get(names["prd"])
    if pos is not None:
        m.put(("positional_embedding",), pos.reshape(pos.shape[-2:]), names["pos"])
    if prd is not None:
        m.put(("prd_emb",), prd.reshape(-1), names["prd"])
    if cfg.final_ln:
        m.norm(("final_ln",), names["final_ln"], ("ln",))
    m.linear(("out_proj",), names["out_proj"])
    for i in range(cfg.num_layers):
        p = names["block"].format(i=i)
        dst = ("transformer", f"layers_{i}")
        m.norm(dst + ("ln1",), p + names["ln1"], ("ln",))
        m.norm(dst + ("ln2",), p + names["ln2"], ("ln",))
        m.linear(dst + ("mlp", "fc1"), p + names["fc1"])
        m.linear(dst + ("mlp", "fc2"), p + names["fc2"])
        if fused_qkv:
            from unclip_jax.models.prior import split_fused_qkv

            wq, bq = m.get(p + names["qkv"] + ".weight"), m.get(p + names["qkv"] + ".bias")
            if wq is not None and bq is not None:
                try:
                    parts = split_fused_qkv(wq, bq, h)
                except ValueError as e:
                    m.problems.append(f"{p}{names['qkv']}: {e}")
                    parts = {}
                for k, v in parts.items():
                    m.put(dst + ("attn", k, "kernel"), v["kernel"], p + names["qkv"])
                    m.put(dst + ("attn", k, "bias"), v["bias"], p + names["qkv"])
        else:
            for ours, theirs in (("query", "to_q"), ("key", "to_k"), ("value", "to_v")):
                wq, bq = m.get(f"{p}attn1.{theirs}.weight"), m.get(f"{p}attn1.{theirs}.bias")
                if wq is not None:
                    m.put(dst + ("attn", ours, "kernel"),
                          wq.reshape(h, dh, -1).transpose(2, 0, 1), f"{p}attn1.{theirs}.weight")
                if bq is not None:
                    m.put(dst + ("attn", ours, "bias"), bq.reshape(h, dh),
                          f"{p}attn1.{theirs}.bias")
        wo, bo = m.get(p + names["attn_out"] + ".weight"), m.get(p + names["attn_out"] + ".bias")
        if wo is not None:
            m.put(dst + ("attn", "out", "kernel"), wo.T.reshape(h, dh, -1), p + names["attn_out"])
        m.put(dst + ("attn", "out", "bias"), bo, p + names["attn_out"] + ".bias")
    if stats is None:
        mean, std = m.get(names["mean"]), m.get(names["std"])
    else:
        mean, std = stats
    params = m.finish()
    d = cfg.clip_dim
    buffers = {}
    for k, v in (("clip_mean", mean), ("clip_std", std)):
        v = np.asarray(v, np.float32).reshape(-1)
        if v.shape != (d,):
            raise CheckpointMismatchError(f"{what}: {k} has {v.shape}, expected ({d},)")
        buffers[k] = v
    return params, buffers


DIFFUSERS_PRIOR_NAMES = dict(
    time1="time_embedding.linear_1", time2="time_embedding.linear_2", clip_img_proj="proj_in",
    text_emb_proj="embedding_proj", text_enc_proj="encoder_hidden_states_proj",
    pos="positional_embedding", prd="prd_embedding", final_ln="norm_out",
    out_proj="proj_to_clip_embeddings", block="transformer_blocks.{i}.", ln1="norm1",
    ln2="norm3", fc1="ff.net.0.proj", fc2="ff.net.2", attn_out="attn1.to_out.0",
    mean="clip_mean", std="clip_std")


def convert_diffusers_prior(state_dict: Mapping[str, Any], cfg,
                            report: Optional[ConversionReport] = None) -> tuple[dict, dict]:
    """diffusers ``PriorTransformer`` state dict -> ``(params, buffers)`` for ``PriorConfig``
    ``cfg`` (buffers: ``clip_mean``, ``clip_std``; set the null condition separately)."""
    return prior_from_sd(state_dict, cfg, DIFFUSERS_PRIOR_NAMES, fused_qkv=False,
                         what="diffusers prior", report=report)


# ----------------------------------------------------------------------------- configs


class UnsupportedConfigError(ValueError):
    """A diffusers / Karlo config option that our models do not implement."""


def _check(cfg: Mapping, where: str, **want):
    bad = []
    for k, v in want.items():
        got = cfg.get(k, v if not isinstance(v, tuple) else v[0])
        ok = got in v if isinstance(v, tuple) else got == v
        if not ok:
            bad.append(f"{k}={got!r} (supported: {v!r})")
    if bad:
        raise UnsupportedConfigError(f"{where}: unsupported option(s) " + ", ".join(bad))


def prior_config_from_diffusers(c: Mapping, **kw):
    from unclip_jax.models.prior import PriorConfig

    _check(c, "prior/config.json", additional_embeddings=4, norm_in_type=(None,),
           embedding_proj_norm_type=(None,), encoder_hid_proj_type=("linear",),
           added_emb_type=("prd",), time_embed_act_fn=("silu",), time_embed_dim=(None,),
           embedding_proj_dim=(None,), clip_embed_dim=(None,))
    heads, dh = int(c.get("num_attention_heads", 32)), int(c.get("attention_head_dim", 64))
    d = int(c.get("embedding_dim", 768))
    return PriorConfig(clip_dim=d, width=heads * dh, num_layers=int(c.get("num_layers", 20)),
                       num_heads=heads, num_text_tokens=int(c.get("num_embeddings", 77)),
                       text_states_dim=d, dropout=0.0, null_cond="buffer", **kw)


def _levels(block_out_channels) -> tuple[int, tuple]:
    boc = [int(x) for x in block_out_channels]
    mc = boc[0]
    if any(b % mc for b in boc):
        raise UnsupportedConfigError(f"block_out_channels {boc} are not multiples of {boc[0]}")
    return mc, tuple(b // mc for b in boc)


def decoder_config_from_diffusers(c: Mapping, tp: Mapping, text_ctx: int, **kw):
    """UNet2DConditionModel config + UnCLIPTextProjModel config -> UNetConfig."""
    from unclip_jax.models.unet import UNetConfig

    _check(c, "decoder/config.json", class_embed_type=("identity",), act_fn=("silu",),
           flip_sin_to_cos=(True,), freq_shift=(0,), time_embedding_type=("positional",),
           resnet_time_scale_shift=("scale_shift", "default"), only_cross_attention=(False,),
           mid_block_type=("UNetMidBlock2DSimpleCrossAttn",), addition_embed_type=(None,),
           encoder_hid_dim=(None,), cross_attention_norm=(None,), conv_in_kernel=(3,),
           conv_out_kernel=(3,), time_embedding_dim=(None,), upcast_attention=(False,))
    down = list(c["down_block_types"])
    ok_down = {"ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"}
    ok_up = {"ResnetUpsampleBlock2D", "SimpleCrossAttnUpBlock2D"}
    if set(down) - ok_down or set(c["up_block_types"]) - ok_up:
        raise UnsupportedConfigError(f"decoder block types {down} / {c['up_block_types']}: "
                                     f"supported {sorted(ok_down)} / {sorted(ok_up)}")
    lpb = c.get("layers_per_block", 2)
    if not isinstance(lpb, int):
        raise UnsupportedConfigError(f"per-level layers_per_block {lpb} is not supported")
    mc, mult = _levels(c["block_out_channels"])
    size = int(c["sample_size"])
    attn_res = tuple(size // 2 ** i for i, t in enumerate(down) if "CrossAttn" in t)
    head = c.get("attention_head_dim", 8)
    if not isinstance(head, int):
        raise UnsupportedConfigError(f"per-level attention_head_dim {head} is not supported")
    out = int(c.get("out_channels", 4))
    inn = int(c.get("in_channels", 4))
    if out not in (inn, 2 * inn):
        raise UnsupportedConfigError(f"decoder out_channels {out} for in_channels {inn}")
    clip_dim = int(tp["clip_embeddings_dim"])
    if int(tp["time_embed_dim"]) != 4 * mc:
        raise UnsupportedConfigError(f"text_proj time_embed_dim {tp['time_embed_dim']} != 4 * {mc}")
    if int(tp["cross_attention_dim"]) != int(c["cross_attention_dim"]):
        raise UnsupportedConfigError("text_proj and decoder cross_attention_dim differ")
    return UNetConfig(
        image_size=size, in_channels=inn, out_channels=inn, model_channels=mc,
        channel_mult=mult, num_res_blocks=lpb, attention_resolutions=attn_res,
        num_head_channels=int(head), use_middle_attention=True, dropout=0.0,
        use_scale_shift_norm=c.get("resnet_time_scale_shift") == "scale_shift",
        resblock_updown=True, learn_sigma=out == 2 * inn,
        norm_groups=int(c.get("norm_num_groups", 32)), norm_eps=float(c.get("norm_eps", 1e-5)),
        clip_dim=clip_dim, clip_emb_mult=int(tp.get("clip_extra_context_tokens", 4)),
        use_clip_null=True, text_encoder="clip", context_dim=int(c["cross_attention_dim"]),
        text_ctx=text_ctx, text_states_dim=clip_dim, text_emb_dim=clip_dim, **kw)


def sr_config_from_diffusers(c: Mapping, **kw):
    """UNet2DModel config (in_channels = 2 * image channels) -> UNetConfig (bicubic resize)."""
    from unclip_jax.models.unet import UNetConfig

    _check(c, "super_res/config.json", act_fn=("silu",), flip_sin_to_cos=(True,),
           freq_shift=(0,), time_embedding_type=("positional",), class_embed_type=(None,),
           resnet_time_scale_shift=("default", "scale_shift"), num_class_embeds=(None,))
    types = set(c["down_block_types"]) | set(c["up_block_types"])
    ok = {"ResnetDownsampleBlock2D", "ResnetUpsampleBlock2D"}
    if types - ok:
        raise UnsupportedConfigError(f"super-res block types {sorted(types)}: "
                                     f"supported {sorted(ok)}")
    inn, out = int(c["in_channels"]), int(c["out_channels"])
    if inn != 2 * out:
        raise UnsupportedConfigError(f"super-res in_channels {inn} != 2 * out_channels {out}")
    mc, mult = _levels(c["block_out_channels"])
    head = c.get("attention_head_dim", 8)
    return UNetConfig(
        image_size=int(c["sample_size"]), in_channels=out, out_channels=out, model_channels=mc,
        channel_mult=mult, num_res_blocks=int(c.get("layers_per_block", 2)),
        attention_resolutions=(), num_head_channels=int(head or mc * mult[-1]),
        use_middle_attention=bool(c.get("add_attention", True)), dropout=0.0,
        use_scale_shift_norm=c.get("resnet_time_scale_shift") == "scale_shift",
        resblock_updown=True, learn_sigma=False, norm_groups=int(c.get("norm_num_groups", 32)),
        norm_eps=float(c.get("norm_eps", 1e-5)), low_res_cond=True,
        low_res_resize_method="bicubic", **kw)


def diffusion_section(sched: Mapping, *, sample_steps, guidance=None, stage: str) -> dict:
    """An ``UnCLIPScheduler`` config -> our ``config.diffusion.<stage>`` dict."""
    _check(sched, f"{stage} scheduler", beta_schedule=("squaredcos_cap_v2",),
           variance_type=("fixed_small_log", "learned_range"),
           prediction_type=("epsilon", "sample"))
    var = sched.get("variance_type", "fixed_small_log")
    out = dict(steps=int(sched.get("num_train_timesteps", 1000)), schedule="cosine",
               model_output="x0" if sched.get("prediction_type") == "sample" else "eps",
               model_var_type="learned_range" if var == "learned_range" else "fixed_small",
               sample_steps=str(sample_steps), sampler="ddpm")
    if guidance is not None:
        out["guidance"] = float(guidance)
    if stage == "prior":
        clip = sched.get("clip_sample", True)
        rng = sched.get("clip_sample_range", 1.0)
        out.update(num_candidates=1, clip_range=float(rng) if clip else 0.0)
    elif not sched.get("clip_sample", True) or float(sched.get("clip_sample_range", 1.0)) != 1.0:
        raise UnsupportedConfigError(f"{stage} scheduler: only clip_sample to [-1, 1] is supported")
    return out


# ----------------------------------------------------------------------------- pipeline dirs


def _read_json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def _component_sd(folder: str) -> dict:
    """Weights of one diffusers component folder (safetensors or bin) as numpy."""
    from unclip_jax.convert.hf_clip import _read_file, _read_sharded, load_hf_state_dict

    if not os.path.isdir(folder):
        raise FileNotFoundError(f"component folder not found: {folder}")
    for name in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"):
        if os.path.isfile(os.path.join(folder, name)):
            return _read_file(os.path.join(folder, name))
    for name in ("diffusion_pytorch_model.safetensors.index.json",
                 "diffusion_pytorch_model.bin.index.json"):
        if os.path.isfile(os.path.join(folder, name)):
            return _read_sharded(os.path.join(folder, name))
    return load_hf_state_dict(folder)


def _component_config(folder: str) -> dict:
    p = os.path.join(folder, "config.json")
    if not os.path.isfile(p):
        raise FileNotFoundError(f"{p} missing")
    return _read_json(p)


def _scheduler_config(root: str, name: str) -> dict:
    p = os.path.join(root, name, "scheduler_config.json")
    if not os.path.isfile(p):
        raise FileNotFoundError(f"{p} missing")
    return _read_json(p)


def clip_from_components(text_dir: str, image_dir: Optional[str] = None,
                         clip_path: Optional[str] = None,
                         report: Optional[ConversionReport] = None) -> tuple[dict, Any, bool]:
    """Our CLIP params + CLIPConfig from a text encoder folder (CLIPTextModelWithProjection)
    and optionally a vision tower: ``image_dir`` (CLIPVisionModelWithProjection) or
    ``clip_path`` (a HF CLIPModel dir or an OpenAI CLIP file). Returns (params, config,
    has_vision)."""
    from unclip_jax.convert.hf_clip import convert_hf_state_dict, load_hf_config, load_hf_state_dict

    tcfg = load_hf_config(text_dir)
    params = convert_hf_state_dict(load_hf_state_dict(text_dir), tcfg,
                                   parts={"text", "text_projection"})
    cfg = tcfg
    vparams = None
    if image_dir is not None:
        vcfg = load_hf_config(image_dir)
        vparams = convert_hf_state_dict(load_hf_state_dict(image_dir), vcfg,
                                        parts={"vision", "visual_projection"})
    elif clip_path is not None:
        if os.path.isdir(clip_path):
            vcfg = load_hf_config(clip_path)
            sd = load_hf_state_dict(clip_path)
            sd = {k: v for k, v in sd.items()
                  if k.startswith(("vision_model.", "visual_projection"))}
        else:
            from unclip_jax.convert.openai_clip import load_openai_clip

            full, vcfg = load_openai_clip(clip_path)
            vparams = {k: full[k] for k in ("vision_model", "visual_projection", "logit_scale")
                       if k in full}
        if vparams is None:
            vparams = convert_hf_state_dict(sd, vcfg, parts={"vision", "visual_projection"})
    if vparams is not None:
        if vcfg.projection_dim != tcfg.projection_dim:
            raise CheckpointMismatchError(
                f"CLIP image tower projects to {vcfg.projection_dim}, the text tower to "
                f"{tcfg.projection_dim}: they are not the same CLIP")
        cfg = dataclasses.replace(tcfg, vision_config=vcfg.vision_config)
        params = {**params, **vparams}
        scale = vparams.pop("logit_scale", None)
        if scale is None and clip_path is not None and os.path.isdir(clip_path):
            scale = load_hf_state_dict(clip_path).get("logit_scale")
        if scale is None:
            # separate towers carry no logit scale; use CLIP's initial value ln(1 / 0.07)
            # (only zero-shot probabilities use it) and say so
            scale = np.float32(np.log(1 / 0.07))
            if report is not None:
                report.notes.append("CLIP logit_scale not in the checkpoints: set to ln(1/0.07)")
        params["logit_scale"] = np.asarray(scale, np.float32).reshape(())
    if report is not None:
        report.params += len(flatten(params))
    return params, cfg, vparams is not None


def empty_caption_condition(clip_params, clip_cfg, tokenizer_dir: str, num_tokens: int):
    """CLIP encoding of the empty caption: (emb [D], states [T, W], mask [T] bool)."""
    import jax.numpy as jnp

    from unclip_jax.models.clip import CLIP
    from unclip_jax.models.tokenizer import load_tokenizer, tokenize_with_info

    tok = tokenize_with_info([""], num_tokens, tokenizer=load_tokenizer(tokenizer_dir))
    emb, states = CLIP(clip_cfg).apply({"params": clip_params}, jnp.asarray(tok.ids),
                                       method="encode_text_and_states")
    return np.asarray(emb[0]), np.asarray(states[0]), np.asarray(tok.mask[0], bool)


def _prior_variables(params, buffers, cfg, null):
    """Assemble {'params', 'buffers'} with stats and the null caption (numpy, unboxed)."""
    emb, states, mask = null
    return {"params": params,
            "buffers": {"clip_mean": buffers["clip_mean"], "clip_std": buffers["clip_std"],
                        "null_text_emb": np.asarray(emb, np.float32),
                        "null_text_states": np.asarray(states, np.float32),
                        "null_text_mask": np.asarray(mask, bool)}}


def _unet_dict(cfg) -> dict:
    d = dataclasses.asdict(cfg)
    d.pop("dtype", None)
    d.pop("param_dtype", None)
    return d


def _prior_dict(cfg) -> dict:
    d = dataclasses.asdict(cfg)
    d.pop("dtype", None)
    d.pop("param_dtype", None)
    return d


def build_config(name: str, clip_cfg, prior_cfg, dec_cfg, sr_cfgs, diffusion: dict,
                 sr_last: Iterable[int] = (), text_only: bool = False):
    import ml_collections

    c = ml_collections.ConfigDict()
    c.name = name
    c.dtype = "float32"
    c.clip = clip_cfg.to_dict()
    c.prior = _prior_dict(prior_cfg)
    c.decoder = _unet_dict(dec_cfg)
    c.sr = [_unet_dict(s) for s in sr_cfgs]
    c.diffusion = ml_collections.ConfigDict(diffusion)
    if sr_last:
        c.sr_last_step = [int(i) for i in sr_last]
    if text_only:
        c.clip_text_only = True
    return c


def convert_diffusers_pipeline(src: str, out: Optional[str] = None, *,
                               image_encoder: Optional[str] = None,
                               clip: Optional[str] = None,
                               prior_steps: int = 25, decoder_steps: int = 25, sr_steps: int = 7,
                               prior_guidance: float = 4.0, decoder_guidance: float = 8.0,
                               report: Optional[ConversionReport] = None):
    """Convert a saved ``UnCLIPPipeline`` dir ``src`` into an ``UnCLIP`` (written to ``out``
    when given). ``image_encoder``: a folder holding a ``CLIPVisionModelWithProjection`` (an
    ``UnCLIPImageVariationPipeline`` dir or its ``image_encoder/``); ``clip``: a HF CLIP dir or
    an OpenAI CLIP file whose vision tower to use. Without either (and without
    ``src/image_encoder``) the model is text-only (image-input subcommands refuse it).
    Step counts / guidance: the diffusers pipeline's defaults. Returns the ``UnCLIP``."""
    import jax.numpy as jnp

    from unclip_jax.pipelines import model as model_lib

    report = report if report is not None else ConversionReport()
    comp = lambda n: os.path.join(src, n)  # noqa: E731
    for need in ("prior", "text_proj", "decoder", "super_res_first", "text_encoder", "tokenizer"):
        if not os.path.isdir(comp(need)):
            raise FileNotFoundError(f"{src} is not a saved diffusers UnCLIPPipeline: no {need}/ "
                                    "(an UnCLIPImageVariationPipeline has no prior; pass it with "
                                    "--image-encoder)")
    if image_encoder is not None and os.path.isdir(os.path.join(image_encoder, "image_encoder")):
        image_encoder = os.path.join(image_encoder, "image_encoder")
    if image_encoder is None and clip is None and os.path.isdir(comp("image_encoder")):
        image_encoder = comp("image_encoder")
    clip_params, clip_cfg, has_vision = clip_from_components(comp("text_encoder"), image_encoder,
                                                             clip, report)
    tok_dir = comp("tokenizer")
    text_ctx = clip_cfg.text_config.max_position_embeddings

    prior_cfg = prior_config_from_diffusers(_component_config(comp("prior")))
    if prior_cfg.num_text_tokens != text_ctx:
        raise UnsupportedConfigError(f"prior num_embeddings {prior_cfg.num_text_tokens} != CLIP "
                                     f"context {text_ctx}")
    p_params, p_buf = convert_diffusers_prior(_component_sd(comp("prior")), prior_cfg, report)
    null = empty_caption_condition(clip_params, clip_cfg, tok_dir, text_ctx)
    prior_vars = _prior_variables(p_params, p_buf, prior_cfg, null)

    dec_cfg = decoder_config_from_diffusers(_component_config(comp("decoder")),
                                            _component_config(comp("text_proj")), text_ctx)
    dec_params = convert_diffusers_unet(_component_sd(comp("decoder")), dec_cfg,
                                        text_proj=_component_sd(comp("text_proj")),
                                        what="diffusers decoder", report=report)
    sr_cfg = sr_config_from_diffusers(_component_config(comp("super_res_first")))
    sr_params = convert_diffusers_unet(_component_sd(comp("super_res_first")), sr_cfg,
                                       what="diffusers super_res_first", report=report)
    sr_last = {}
    if os.path.isdir(comp("super_res_last")):
        last_cfg = sr_config_from_diffusers(_component_config(comp("super_res_last")))
        if last_cfg != sr_cfg:
            raise UnsupportedConfigError("super_res_first and super_res_last differ in structure")
        sr_last["0"] = convert_diffusers_unet(_component_sd(comp("super_res_last")), sr_cfg,
                                              what="diffusers super_res_last", report=report)
    diffusion = {
        "prior": diffusion_section(_scheduler_config(src, "prior_scheduler"),
                                   sample_steps=prior_steps, guidance=prior_guidance,
                                   stage="prior"),
        "decoder": diffusion_section(_scheduler_config(src, "decoder_scheduler"),
                                     sample_steps=decoder_steps, guidance=decoder_guidance,
                                     stage="decoder"),
        "sr": diffusion_section(_scheduler_config(src, "super_res_scheduler"),
                                sample_steps=sr_steps, stage="sr"),
    }
    diffusion["decoder"]["uncond_caption"] = "empty"
    config = build_config(f"diffusers:{os.path.basename(os.path.abspath(src))}", clip_cfg,
                          prior_cfg, dec_cfg, [sr_cfg], diffusion,
                          sr_last=[0] if sr_last else (), text_only=not has_vision)
    to_j = lambda t: _tree_map(jnp.asarray, t)  # noqa: E731
    params = {"clip": to_j(clip_params), "prior": to_j(prior_vars), "decoder": to_j(dec_params),
              "sr": [to_j(sr_params)]}
    if sr_last:
        params["sr_last"] = to_j(sr_last)
    model = model_lib.UnCLIP(config, params, tokenizer_dir=tok_dir, random_weights=False,
                             source=os.path.abspath(src))
    if out is not None:
        model_lib.save(model, out)
    return model


def _tree_map(fn: Callable, tree):
    if isinstance(tree, Mapping):
        return {k: _tree_map(fn, v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_tree_map(fn, v) for v in tree]
    return fn(tree)


__all__ = [
    "ConversionReport", "Mapper", "CheckpointMismatchError", "UnsupportedConfigError",
    "convert_diffusers_unet", "convert_diffusers_prior", "convert_diffusers_pipeline",
    "prior_config_from_diffusers", "decoder_config_from_diffusers", "sr_config_from_diffusers",
    "diffusion_section", "clip_from_components", "empty_caption_condition", "unet_blocks",
    "permute_clip_tokens", "interleave_heads", "build_config",
]
