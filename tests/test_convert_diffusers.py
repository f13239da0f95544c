"""diffusers unCLIP -> unclip_jax: conversion exactness and parity (CPU, fp32, tiny random weights).

A tiny ``UnCLIPPipeline`` (PriorTransformer, UnCLIPTextProjModel, a decoder UNet2DConditionModel
with simple cross-attention blocks, two SR UNet2DModels, CLIPTextModelWithProjection, three
UnCLIPSchedulers) is built like diffusers' own tests build theirs, saved, converted with
``unclip convert diffusers``, and compared model by model, step by step and end to end with the
same noise (diffusers' scheduler draws fresh variance noise at every step t > 0; the tests feed
it ours).
"""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import torch
import diffusers

from unclip_jax.convert import diffusers_unclip as du  # noqa: E402
from unclip_jax.convert.hf_clip import CheckpointMismatchError  # noqa: E402
from unclip_jax.diffusion import create_gaussian_diffusion, ddpm_step  # noqa: E402
from unclip_jax.models.tokenizer import DEFAULT_TOKENIZER_DIR  # noqa: E402

D = 16  # CLIP embedding = text width = prior embedding dim (diffusers ties them)
DEC, SR = 16, 32  # decoder / upsampler image sizes
STEPS = 3


def _randomize(module, std=0.15, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith(("norm.weight", "norm1.weight", "norm2.weight", "norm3.weight")):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(std * torch.randn(p.shape, generator=g))
    return module.eval()


def build_components():
    from diffusers import PriorTransformer, UnCLIPScheduler, UNet2DConditionModel, UNet2DModel
    from diffusers.pipelines.unclip.text_proj import UnCLIPTextProjModel
    from transformers import (CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer,
                              CLIPVisionConfig, CLIPVisionModelWithProjection)

    torch.manual_seed(0)
    tok = CLIPTokenizer.from_pretrained(DEFAULT_TOKENIZER_DIR, model_max_length=77)
    text_encoder = _randomize(CLIPTextModelWithProjection(CLIPTextConfig(
        bos_token_id=0, eos_token_id=2, hidden_size=D, projection_dim=D, intermediate_size=32,
        layer_norm_eps=1e-5, num_attention_heads=2, num_hidden_layers=2, pad_token_id=1,
        vocab_size=49408, max_position_embeddings=77)), seed=1)
    image_encoder = _randomize(CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=D, projection_dim=D, num_hidden_layers=2, num_attention_heads=2,
        image_size=32, intermediate_size=32, patch_size=16)), seed=2)
    prior = _randomize(PriorTransformer(num_attention_heads=2, attention_head_dim=8,
                                        num_layers=2, embedding_dim=D, num_embeddings=77), seed=3)
    with torch.no_grad():
        prior.clip_mean.normal_(0, 0.3)
        prior.clip_std.uniform_(0.5, 1.5)
    text_proj = _randomize(UnCLIPTextProjModel(clip_extra_context_tokens=4,
                                               clip_embeddings_dim=D, time_embed_dim=64,
                                               cross_attention_dim=24), seed=4)
    decoder = _randomize(UNet2DConditionModel(
        sample_size=DEC, in_channels=3, out_channels=6,
        down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
        up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
        mid_block_type="UNetMidBlock2DSimpleCrossAttn", block_out_channels=(16, 32),
        layers_per_block=1, cross_attention_dim=24, attention_head_dim=8,
        resnet_time_scale_shift="scale_shift", class_embed_type="identity",
        norm_num_groups=8), std=0.08, seed=5)
    sr_kw = dict(sample_size=SR, in_channels=6, out_channels=3,
                 down_block_types=("ResnetDownsampleBlock2D",) * 2,
                 up_block_types=("ResnetUpsampleBlock2D",) * 2, block_out_channels=(16, 32),
                 layers_per_block=1, norm_num_groups=8, add_attention=False)
    # well-conditioned random UNets (small gain), like trained ones: with a large gain the
    # first step (t = 999, x0 = (x - eps) / 5e-5, clipped) turns float32 noise into sign flips
    sr_first = _randomize(UNet2DModel(**sr_kw), std=0.05, seed=6)
    sr_last = _randomize(UNet2DModel(**sr_kw), std=0.05, seed=7)
    schedulers = dict(
        prior_scheduler=UnCLIPScheduler(variance_type="fixed_small_log", prediction_type="sample",
                                        num_train_timesteps=1000, clip_sample_range=5.0),
        decoder_scheduler=UnCLIPScheduler(variance_type="learned_range",
                                          prediction_type="epsilon", num_train_timesteps=1000),
        super_res_scheduler=UnCLIPScheduler(variance_type="fixed_small_log",
                                            prediction_type="epsilon", num_train_timesteps=1000))
    return dict(prior=prior, decoder=decoder, text_proj=text_proj, text_encoder=text_encoder,
                tokenizer=tok, super_res_first=sr_first, super_res_last=sr_last,
                image_encoder=image_encoder, **schedulers)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    from diffusers import UnCLIPPipeline

    comps = build_components()
    image_encoder = comps.pop("image_encoder")
    pipe = UnCLIPPipeline(**comps)
    root = tmp_path_factory.mktemp("diffusers_unclip")
    src = str(root / "pipe")
    pipe.save_pretrained(src)
    image_encoder.save_pretrained(str(root / "variation" / "image_encoder"))
    out = str(root / "model")
    from unclip_jax.convert.cli import convert_main

    assert convert_main(["diffusers", src, out, "--image-encoder", str(root / "variation")]) == 0
    from unclip_jax.pipelines import model as model_lib

    model = model_lib.load(out)
    return dict(pipe=pipe, comps=comps, image_encoder=image_encoder, model=model, src=src,
                root=root)


def _nhwc(x):
    return np.asarray(x.detach().numpy() if hasattr(x, "detach") else x).transpose(0, 2, 3, 1)


# ------------------------------------------------------------------------------ single forwards


def test_model_dir_metadata(converted):
    m = converted["model"]
    assert not m.random_weights
    assert m.config.sr_last_step == [0] and "0" in m.params["sr_last"]
    assert m.config.diffusion.decoder.uncond_caption == "empty"
    assert m.config.diffusion.prior.clip_range == 5.0
    assert m.config.diffusion.prior.model_output == "x0"
    assert m.config.diffusion.decoder.model_var_type == "learned_range"
    assert os.path.isfile(os.path.join(m.source, "tokenizer", "vocab.json"))


def test_clip_text_and_image_match(converted):
    m, comps = converted["model"], converted["comps"]
    from unclip_jax.pipelines import stages

    prompts = ["a red heart", ""]
    text = stages.encode_text(m, prompts)
    tok = comps["tokenizer"](prompts, padding="max_length", max_length=77, return_tensors="pt")
    with torch.no_grad():
        ref = comps["text_encoder"](tok.input_ids)
    np.testing.assert_allclose(text.emb, ref.text_embeds.numpy(), atol=1e-4)
    mask = tok.attention_mask.numpy().astype(bool)
    np.testing.assert_array_equal(np.asarray(text.mask), mask)
    got, want = np.asarray(text.states), ref.last_hidden_state.numpy()
    np.testing.assert_allclose(got[mask], want[mask], atol=1e-4)
    pix = np.random.RandomState(0).randn(2, 32, 32, 3).astype(np.float32)
    with torch.no_grad():
        want = converted["image_encoder"](torch.from_numpy(pix.transpose(0, 3, 1, 2))).image_embeds
    np.testing.assert_allclose(stages.encode_image(m, pix), want.numpy(), atol=1e-4)


def test_prior_forward_matches(converted):
    m, prior = converted["model"], converted["comps"]["prior"]
    rng = np.random.RandomState(0)
    b = 3
    x, emb = rng.randn(b, D).astype(np.float32), rng.randn(b, D).astype(np.float32)
    states = rng.randn(b, 77, D).astype(np.float32)
    mask = np.arange(77)[None] < np.array([77, 9, 2])[:, None]
    t = np.array([0, 17, 999])
    with torch.no_grad():
        want = prior(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(emb),
                     torch.from_numpy(states), torch.from_numpy(mask)).predicted_image_embedding
    got = m.prior.apply(m.params["prior"], jnp.asarray(x), jnp.asarray(t), jnp.asarray(emb),
                        jnp.asarray(states), jnp.asarray(mask))
    np.testing.assert_allclose(got, want.numpy(), atol=1e-4)


def test_decoder_forward_matches(converted):
    m, comps = converted["model"], converted["comps"]
    rng = np.random.RandomState(1)
    b = 2
    x = rng.randn(b, 3, DEC, DEC).astype(np.float32)
    img, pe = rng.randn(b, D).astype(np.float32), rng.randn(b, D).astype(np.float32)
    hs = rng.randn(b, 77, D).astype(np.float32)
    mask = np.arange(77)[None] < np.array([5, 77])[:, None]
    t = np.array([3, 800])
    with torch.no_grad():
        ehs, add = comps["text_proj"](image_embeddings=torch.from_numpy(img),
                                      prompt_embeds=torch.from_numpy(pe),
                                      text_encoder_hidden_states=torch.from_numpy(hs),
                                      do_classifier_free_guidance=False)
        dmask = torch.nn.functional.pad(torch.from_numpy(mask), (4, 0), value=True)
        want = comps["decoder"](torch.from_numpy(x), torch.from_numpy(t), encoder_hidden_states=ehs,
                                class_labels=add, attention_mask=dmask).sample
    got = m.decoder.apply({"params": m.params["decoder"]}, jnp.asarray(_nhwc(x)), jnp.asarray(t),
                          clip_emb=jnp.asarray(img), text_states=jnp.asarray(hs),
                          text_emb=jnp.asarray(pe), text_mask=jnp.asarray(mask))
    np.testing.assert_allclose(got, _nhwc(want), atol=1e-4)
    # the learned null image embedding (diffusers' learned_classifier_free_guidance_embeddings)
    null = comps["text_proj"].learned_classifier_free_guidance_embeddings.detach().numpy()
    got2 = m.decoder.apply({"params": m.params["decoder"]}, jnp.asarray(_nhwc(x)), jnp.asarray(t),
                           clip_emb=jnp.asarray(img), text_states=jnp.asarray(hs),
                           text_emb=jnp.asarray(pe), text_mask=jnp.asarray(mask),
                           drop_clip=jnp.ones((b,), bool))
    got3 = m.decoder.apply({"params": m.params["decoder"]}, jnp.asarray(_nhwc(x)), jnp.asarray(t),
                           clip_emb=jnp.broadcast_to(jnp.asarray(null), (b, D)),
                           text_states=jnp.asarray(hs), text_emb=jnp.asarray(pe),
                           text_mask=jnp.asarray(mask))
    np.testing.assert_allclose(got2, got3, atol=1e-5)


@pytest.mark.parametrize("which", ["super_res_first", "super_res_last"])
def test_super_res_forward_matches(converted, which):
    m, comps = converted["model"], converted["comps"]
    rng = np.random.RandomState(2)
    x = rng.randn(2, 3, SR, SR).astype(np.float32)
    low = np.tanh(rng.randn(2, 3, DEC, DEC)).astype(np.float32)
    t = np.array([0, 640])
    up = torch.nn.functional.interpolate(torch.from_numpy(low), size=[SR, SR], mode="bicubic",
                                         align_corners=False, antialias=True)
    with torch.no_grad():
        want = comps[which](torch.cat([torch.from_numpy(x), up], 1), torch.from_numpy(t)).sample
    params = m.params["sr"][0] if which == "super_res_first" else m.params["sr_last"]["0"]
    got = m.upsamplers[0].apply({"params": params}, jnp.asarray(_nhwc(x)), jnp.asarray(t),
                                low_res=jnp.asarray(_nhwc(low)))
    np.testing.assert_allclose(got, _nhwc(want), atol=1e-4)


# ------------------------------------------------------------------------------ scheduler steps


@pytest.mark.parametrize("kind", ["prior", "decoder", "sr"])
def test_scheduler_step_matches(converted, kind, monkeypatch):
    import diffusers.schedulers.scheduling_unclip as su

    m, pipe = converted["model"], converted["pipe"]
    sched = {"prior": pipe.prior_scheduler, "decoder": pipe.decoder_scheduler,
             "sr": pipe.super_res_scheduler}[kind]
    stage = {"prior": "prior", "decoder": "decoder", "sr": "sr"}[kind]
    n = 7
    sched.set_timesteps(n)
    diffusion = m.diffusion(stage, n)
    np.testing.assert_array_equal(np.asarray(diffusion.timestep_map)[::-1],
                                  sched.timesteps.numpy())
    # the same formulas on diffusers' own float32 alpha_bar table: equal to float32 rounding
    from unclip_jax.diffusion import GaussianDiffusion

    ab = sched.alphas_cumprod.numpy().astype(np.float64)[np.asarray(diffusion.timestep_map)]
    exact = GaussianDiffusion.from_betas(
        1.0 - ab / np.concatenate([[1.0], ab[:-1]]), timestep_map=diffusion.timestep_map,
        model_output=diffusion.model_output, model_var_type=diffusion.model_var_type)
    rng = np.random.RandomState(3)
    shape = (2, D) if kind == "prior" else (2, 4, 4, 3)
    c_out = 3 * (2 if kind == "decoder" else 1)
    clip = m.config.diffusion.prior.clip_range if kind == "prior" else 0.0
    for i in (0, 3, n - 1):
        t_orig = int(sched.timesteps[i])
        prev = int(sched.timesteps[i + 1]) if i < n - 1 else -1
        x = rng.randn(*shape).astype(np.float32)
        out = (rng.randn(*shape[:-1], c_out) * (3.0 if kind == "prior" else 1.0)).astype(np.float32)
        if kind == "prior":
            out = rng.randn(*shape).astype(np.float32) * 4.0  # some entries beyond +-5
        key = jax.random.PRNGKey(i)
        noise = np.array(jax.random.normal(key, shape, jnp.float32))
        to_t = (lambda a: torch.from_numpy(a)) if kind == "prior" else \
            (lambda a: torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2))))
        monkeypatch.setattr(su, "randn_tensor", lambda *a, **k: to_t(noise))
        want = sched.step(to_t(out), t_orig, to_t(x), prev_timestep=prev).prev_sample.numpy()
        if kind != "prior":
            want = want.transpose(0, 2, 3, 1)
        fn = (lambda xx, tt: jnp.clip(jnp.asarray(out), -clip, clip)) if clip else \
            (lambda xx, tt: jnp.asarray(out))
        got, _ = ddpm_step(diffusion, fn, jnp.asarray(x), n - 1 - i, key,
                           clip_denoised=kind != "prior")
        # Our tables are built in float64. diffusers works in float32, which shows at the two
        # ends: at t = 999 it forms alpha = 1 - beta with beta ~ 0.99999 (cancellation, ~1e-4
        # absolute); at t = 0 its x0 coefficient betas[0] / (1 - alphas_cumprod[0]) is 0.99947
        # instead of 1 (float32 rounding of 1 - 4e-5). In between the step agrees to 1e-5.
        atol, rtol = {0: (2e-4, 1e-4), n - 1: (1e-5, 1e-3)}.get(i, (1e-5, 1e-5))
        np.testing.assert_allclose(got, want, atol=atol, rtol=rtol)
        if i not in (0, n - 1):  # the same formulas on diffusers' float32 alpha_bar table
            got, _ = ddpm_step(exact, fn, jnp.asarray(x), n - 1 - i, key,
                               clip_denoised=kind != "prior")
            np.testing.assert_allclose(got, want, atol=1e-6, rtol=1e-6)


def test_respacing_matches_unclip_scheduler_for_many_counts():
    from diffusers import UnCLIPScheduler

    s = UnCLIPScheduler()
    for n in (2, 7, 25, 64, 250, 1000):
        s.set_timesteps(n)
        d = create_gaussian_diffusion(1000, "cosine", str(n))
        np.testing.assert_array_equal(np.asarray(d.timestep_map)[::-1], s.timesteps.numpy())
        ab = s.alphas_cumprod.numpy()[s.timesteps.numpy()[::-1]]
        np.testing.assert_allclose(np.asarray(d.alphas_cumprod), ab, rtol=2e-5, atol=1e-7)


# ------------------------------------------------------------------------------ whole pipeline


def _stage_noise(key, shape, steps):
    """(x_T, [noise of step i for i = 0..steps-2]) exactly as our ddpm_sample draws them."""
    from unclip_jax.diffusion.sampling import init_and_loop_keys, step_keys

    k_init, k_loop = init_and_loop_keys(key)
    x_t = jax.random.normal(k_init, shape, jnp.float32)
    return np.asarray(x_t), [np.asarray(jax.random.normal(step_keys(k_loop, i)[0], shape,
                                                          jnp.float32))
                             for i in range(steps - 1)]


def test_whole_pipeline_matches_with_same_noise(converted, monkeypatch):
    import diffusers.schedulers.scheduling_unclip as su

    from unclip_jax.pipelines.text_to_image import text_to_image

    m, pipe = converted["model"], converted["pipe"]
    prompts = ["a red heart", "a cat on a mat"]
    b = len(prompts)
    key = jax.random.PRNGKey(42)
    ours = text_to_image(m, prompts, key, prior_steps=STEPS, decoder_steps=STEPS,
                         sr_steps=STEPS)
    k_prior, k_rest = jax.random.split(key)
    k_dec, k_sr = jax.random.split(k_rest)
    k_sr0 = jax.random.split(k_sr, 1)[0]
    p0, pn = _stage_noise(k_prior, (b, D), STEPS)
    d0, dn = _stage_noise(k_dec, (b, DEC, DEC, 3), STEPS)
    s0, sn = _stage_noise(k_sr0, (b, SR, SR, 3), STEPS)
    nchw = lambda a: torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2)))  # noqa
    queue = [torch.from_numpy(np.array(a)) for a in pn] + [nchw(a) for a in dn + sn]
    monkeypatch.setattr(su, "randn_tensor", lambda *a, **k: queue.pop(0))
    with torch.no_grad():
        want = pipe(prompts, prior_num_inference_steps=STEPS, decoder_num_inference_steps=STEPS,
                    super_res_num_inference_steps=STEPS,
                    prior_latents=torch.from_numpy(np.array(p0)),
                    decoder_latents=nchw(d0), super_res_latents=nchw(s0),
                    prior_guidance_scale=4.0, decoder_guidance_scale=8.0,
                    output_type="np").images
    assert not queue  # every injected noise was consumed
    got = np.clip(np.asarray(ours["images"]) * 0.5 + 0.5, 0.0, 1.0)
    assert got.shape == want.shape == (b, SR, SR, 3)
    assert np.abs(want - 0.5).max() > 0.05  # not a trivial image
    np.testing.assert_allclose(got, want, atol=1e-3)


# ------------------------------------------------------------------------------ strictness


def test_mismatches_are_reported_by_name(converted):
    comps = converted["comps"]
    m = converted["model"]
    sd = {k: v.numpy() for k, v in comps["super_res_first"].state_dict().items()}
    cfg = m.sr_config[0]
    du.convert_diffusers_unet(sd, cfg)  # the clean one converts
    bad = dict(sd)
    bad.pop("conv_in.bias")
    bad["extra.weight"] = np.zeros(3, np.float32)
    bad["conv_out.weight"] = np.zeros((3, 16, 3, 3), np.float32)[:, :8]
    bad["time_embedding.linear_1.bias"] = np.zeros(64, np.int32)
    with pytest.raises(CheckpointMismatchError) as e:
        du.convert_diffusers_unet(bad, cfg)
    msg = str(e.value)
    for part in ("missing checkpoint key unet.conv_in.bias", "unet.extra.weight",
                 "shape mismatch for unet.conv_out.weight", "time_embedding.linear_1.bias: dtype",
                 "left unassigned"):
        assert part in msg, (part, msg)
    half = {k: v.astype(np.float16) for k, v in sd.items()}
    rep = du.ConversionReport()
    du.convert_diffusers_unet(half, cfg, report=rep)
    assert rep.notes and "upcast to float32" in rep.notes[0]


def test_text_only_conversion_and_missing_components(converted):
    from unclip_jax.convert.cli import convert_main
    from unclip_jax.pipelines import model as model_lib

    root = converted["root"]
    out = str(root / "text_only")
    assert convert_main(["diffusers", converted["src"], out]) == 0
    m = model_lib.load(out)
    assert m.config.clip_text_only and set(m.params["clip"]) == {"text_model",
                                                                  "text_projection"}
    a = du.flatten(m.params["prior"])
    b = du.flatten(converted["model"].params["prior"])
    for k in a:
        np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]))
    # image-input commands on a text-only model: a clear message, not a missing-param error
    from unclip_jax.pipelines import stages
    from unclip_jax.pipelines.model import ModelDirError
    with pytest.raises(ModelDirError, match="no CLIP image encoder"):
        stages.encode_image(m, np.zeros((1, 8, 8, 3), np.float32))
    # a dir that is not an UnCLIPPipeline (e.g. a variation pipeline: no prior/)
    assert convert_main(["diffusers", str(root / "variation"), str(root / "bad")]) == 1
