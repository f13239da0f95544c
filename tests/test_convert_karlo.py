"""Karlo checkpoints -> unclip_jax: exact conversion and parity (CPU, fp32, tiny random weights).

Karlo-format checkpoints are written from the tiny diffusers components of
``test_convert_diffusers`` by renaming their tensors to Karlo's names (the inverse of the public
Karlo -> diffusers conversion: ``model.*`` PriorTransformer with a fused head-major ``c_qkv``,
``model.*`` PLMImUNet with conv1d ``qkv`` / ``encoder_kv``, ``model_first_steps.*`` /
``model_last_step.*`` SR UNets, a ``(mean, std)`` stats file). ``unclip convert karlo`` must give
exactly the parameters the diffusers route gives, and the converted model must match diffusers
module by module and over the whole pipeline with the same noise.
"""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import torch
import diffusers

import test_convert_diffusers as tcd  # noqa: E402

from unclip_jax.convert.diffusers_unclip import flatten  # noqa: E402
from unclip_jax.convert.hf_clip import CheckpointMismatchError  # noqa: E402
from unclip_jax.convert.karlo import KARLO_FILES, convert_karlo_unet  # noqa: E402

STEPS = 3


def _fuse_heads(ws, heads):
    """Separate [C, in] (q, k, v) -> Karlo's fused rows (heads, n, head_dim)."""
    c = ws[0].shape[0]
    return np.stack([w.reshape(heads, c // heads, *w.shape[1:]) for w in ws], 1).reshape(
        len(ws) * c, *ws[0].shape[1:])


def karlo_prior_sd(sd, heads):
    out = {}
    ren = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
           "proj_in": "clip_img_proj", "embedding_proj": "text_emb_proj",
           "encoder_hidden_states_proj": "text_enc_proj", "norm_out": "final_ln",
           "proj_to_clip_embeddings": "out_proj"}
    blk = {"norm1": "ln_1", "norm3": "ln_2", "attn1.to_out.0": "attn.c_proj",
           "ff.net.0.proj": "mlp.c_fc", "ff.net.2": "mlp.c_proj"}
    for k, v in sd.items():
        if k in ("clip_mean", "clip_std"):
            continue
        if k == "positional_embedding":
            out[k] = v
        elif k == "prd_embedding":
            out["prd_emb"] = v
        elif k.startswith("transformer_blocks."):
            i, rest = k.split(".")[1], ".".join(k.split(".")[2:])
            if ".to_q." in k or ".to_k." in k or ".to_v." in k:
                if ".to_q." in k:
                    kind = rest.split(".")[-1]
                    ws = [sd[f"transformer_blocks.{i}.attn1.to_{p}.{kind}"] for p in "qkv"]
                    out[f"transformer.resblocks.{i}.attn.c_qkv.{kind}"] = _fuse_heads(ws, heads)
                continue
            mod, kind = rest.rsplit(".", 1)
            out[f"transformer.resblocks.{i}.{blk[mod]}.{kind}"] = v
        else:
            mod, kind = k.rsplit(".", 1)
            out[f"{ren[mod]}.{kind}"] = v
    return {"model." + k: v for k, v in out.items()}


def _karlo_block_names(n, attn_levels, levels, mid_attn):
    """diffusers block prefix -> Karlo block prefix for the tiny UNets (written out by hand
    from Karlo's UNetModel layout: input_blocks.{i}.{0 res|1 attn}, middle_block.{0,1,2},
    output_blocks.{i}.{0 res|1 attn|last up})."""
    names, idx = {}, 1
    for lv in range(levels):
        for j in range(n):
            names[f"down_blocks.{lv}.resnets.{j}"] = f"input_blocks.{idx}.0"
            names[f"down_blocks.{lv}.attentions.{j}"] = f"input_blocks.{idx}.1"
            idx += 1
        if lv != levels - 1:
            names[f"down_blocks.{lv}.downsamplers.0"] = f"input_blocks.{idx}.0"
            idx += 1
    names["mid_block.resnets.0"] = "middle_block.0"
    names["mid_block.attentions.0"] = "middle_block.1"
    names["mid_block.resnets.1"] = f"middle_block.{2 if mid_attn else 1}"
    idx = 0
    for u in range(levels):
        lv = levels - 1 - u
        for j in range(n + 1):
            names[f"up_blocks.{u}.resnets.{j}"] = f"output_blocks.{idx}.0"
            names[f"up_blocks.{u}.attentions.{j}"] = f"output_blocks.{idx}.1"
            if lv and j == n:
                names[f"up_blocks.{u}.upsamplers.0"] = \
                    f"output_blocks.{idx}.{2 if lv in attn_levels else 1}"
            idx += 1
    return names


def karlo_unet_sd(sd, heads_of, n, attn_levels, levels, mid_attn, text_proj=None):
    blocks = _karlo_block_names(n, attn_levels, levels, mid_attn)
    res = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
           "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
    top = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
           "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
    out = {}
    for k, v in sd.items():
        mod, kind = k.rsplit(".", 1)
        if mod in top:
            out[f"{top[mod]}.{kind}"] = v
            continue
        parts = mod.split(".")
        prefix = ".".join(parts[:4]) if parts[0] != "mid_block" else ".".join(parts[:3])
        sub = mod[len(prefix) + 1:]
        dst = blocks[prefix]
        if ".attentions." in prefix:
            h = heads_of(prefix)
            conv1d = lambda w: w[:, :, None] if kind == "weight" else w  # noqa: E731
            if sub == "group_norm":
                out[f"{dst}.norm.{kind}"] = v
            elif sub == "to_q":
                out[f"{dst}.qkv.{kind}"] = conv1d(_fuse_heads(
                    [sd[f"{prefix}.to_{p}.{kind}"] for p in "qkv"], h))
            elif sub == "add_k_proj":
                out[f"{dst}.encoder_kv.{kind}"] = conv1d(_fuse_heads(
                    [sd[f"{prefix}.add_{p}_proj.{kind}"] for p in "kv"], h))
            elif sub == "to_out.0":
                out[f"{dst}.proj_out.{kind}"] = conv1d(v)
            continue
        out[f"{dst}.{res[sub]}.{kind}"] = v
    if text_proj is not None:
        ren = {"clip_image_embeddings_project_to_time_embeddings": "clip_emb",
               "clip_extra_context_tokens_proj": "clip_tok_proj",
               "encoder_hidden_states_proj": "text_seq_proj.0",
               "text_encoder_hidden_states_norm": "text_seq_proj.1",
               "embedding_proj": "text_feat_proj"}
        for k, v in text_proj.items():
            if k == "learned_classifier_free_guidance_embeddings":
                out["cf_param"] = v
            else:
                mod, kind = k.rsplit(".", 1)
                out[f"{ren[mod]}.{kind}"] = v
    return out


@pytest.fixture(scope="module")
def karlo(tmp_path_factory):
    from diffusers import UnCLIPPipeline, UnCLIPScheduler
    from transformers import CLIPModel

    comps = tcd.build_components()
    image_encoder = comps.pop("image_encoder")
    root = tmp_path_factory.mktemp("karlo")
    # one CLIPModel holding the diffusers text encoder and image encoder (Karlo's ViT-L-14.pt)
    te = comps["text_encoder"]
    from transformers import CLIPConfig

    full = CLIPModel(CLIPConfig(text_config=te.config.to_dict(),
                                vision_config=image_encoder.config.to_dict(),
                                projection_dim=tcd.D)).eval()
    sd = {**{k: v for k, v in te.state_dict().items()},
          **{k: v for k, v in image_encoder.state_dict().items()},
          "logit_scale": torch.tensor(2.0)}
    full.load_state_dict(sd, strict=False)
    full.save_pretrained(str(root / "clip"))
    np_sd = lambda m: {k: v.detach().numpy() for k, v in m.state_dict().items()}  # noqa: E731
    src = root / "release"
    os.makedirs(src)
    prior = np_sd(comps["prior"])
    torch.save({"state_dict": {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in
                               karlo_prior_sd(prior, heads=2).items()}},
               str(src / KARLO_FILES["prior"]))
    torch.save((torch.from_numpy(prior["clip_mean"][0]), torch.from_numpy(prior["clip_std"][0])),
               str(src / KARLO_FILES["stats"]))
    dec = karlo_unet_sd(np_sd(comps["decoder"]), lambda p: 32 // 8,
                        1, {1}, 2, True, text_proj=np_sd(comps["text_proj"]))
    dec = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in dec.items()}
    torch.save({"state_dict": {"model." + k: v for k, v in dec.items()}},
               str(src / KARLO_FILES["decoder"]))
    sr = {}
    for name, prefix in (("super_res_first", "model_first_steps."),
                         ("super_res_last", "model_last_step.")):
        s = karlo_unet_sd(np_sd(comps[name]), None, 1, set(), 2, False)
        sr.update({prefix + k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in s.items()})
    torch.save({"state_dict": sr}, str(src / KARLO_FILES["sr"]))

    overrides = {
        "prior": dict(clip_dim=tcd.D, width=16, num_layers=2, num_heads=2, num_text_tokens=77),
        "decoder": dict(image_size=tcd.DEC, model_channels=16, channel_mult=[1, 2],
                        num_res_blocks=1, attention_resolutions=[tcd.DEC // 2],
                        num_head_channels=8, norm_groups=8, clip_dim=tcd.D, context_dim=24,
                        text_ctx=77, text_states_dim=tcd.D, text_emb_dim=tcd.D),
        "sr": dict(image_size=tcd.SR, model_channels=16, channel_mult=[1, 2], num_res_blocks=1,
                   norm_groups=8),
    }
    from unclip_jax.convert.cli import convert_main
    from unclip_jax.pipelines import model as model_lib

    out = str(root / "model")
    assert convert_main(["karlo", str(src), out, "--clip", str(root / "clip"),
                         "--overrides", json.dumps(overrides)]) == 0
    # the reference: the same weights as a diffusers pipeline with Karlo's prior clamp (+-10)
    comps["prior_scheduler"] = UnCLIPScheduler(variance_type="fixed_small_log",
                                               prediction_type="sample",
                                               num_train_timesteps=1000, clip_sample_range=10.0)
    return dict(model=model_lib.load(out), comps=comps, pipe=UnCLIPPipeline(**comps),
                src=src, root=root)


def test_same_params_as_the_diffusers_route(karlo):
    from unclip_jax.convert import diffusers_unclip as du

    m, comps = karlo["model"], karlo["comps"]
    np_sd = lambda mod: {k: v.detach().numpy() for k, v in mod.state_dict().items()}  # noqa
    ref_dec = du.convert_diffusers_unet(np_sd(comps["decoder"]), m.decoder_config,
                                        text_proj=np_sd(comps["text_proj"]))
    ref_prior, ref_buf = du.convert_diffusers_prior(np_sd(comps["prior"]), m.prior_config)
    ref_sr = du.convert_diffusers_unet(np_sd(comps["super_res_first"]), m.sr_config[0])
    ref_last = du.convert_diffusers_unet(np_sd(comps["super_res_last"]), m.sr_config[0])
    for ours, ref in ((m.params["decoder"], ref_dec), (m.params["prior"]["params"], ref_prior),
                      (m.params["sr"][0], ref_sr), (m.params["sr_last"]["0"], ref_last)):
        a, b = flatten(ours), flatten(ref)
        assert set(a) == set(b)
        for k in a:
            np.testing.assert_array_equal(np.asarray(a[k]), b[k], err_msg="/".join(k))
    for k in ("clip_mean", "clip_std"):
        np.testing.assert_array_equal(m.params["prior"]["buffers"][k], ref_buf[k])
    assert m.config.diffusion.prior.clip_range == 10.0
    assert m.config.diffusion.decoder.uncond_caption == "empty"


def test_prior_and_decoder_forward_match_reference(karlo):
    m, comps = karlo["model"], karlo["comps"]
    rng = np.random.RandomState(5)
    b, d = 2, tcd.D
    x, emb = rng.randn(b, d).astype(np.float32), rng.randn(b, d).astype(np.float32)
    states = rng.randn(b, 77, d).astype(np.float32)
    mask = np.arange(77)[None] < np.array([4, 77])[:, None]
    t = np.array([5, 900])
    with torch.no_grad():
        want = comps["prior"](torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(emb),
                              torch.from_numpy(states), torch.from_numpy(mask))
    got = m.prior.apply(m.params["prior"], x, t, emb, states, mask)
    np.testing.assert_allclose(got, want.predicted_image_embedding.numpy(), atol=1e-4)
    xi = rng.randn(b, 3, tcd.DEC, tcd.DEC).astype(np.float32)
    with torch.no_grad():
        ehs, add = comps["text_proj"](image_embeddings=torch.from_numpy(emb),
                                      prompt_embeds=torch.from_numpy(x),
                                      text_encoder_hidden_states=torch.from_numpy(states),
                                      do_classifier_free_guidance=False)
        dmask = torch.nn.functional.pad(torch.from_numpy(mask), (4, 0), value=True)
        want = comps["decoder"](torch.from_numpy(xi), torch.from_numpy(t),
                                encoder_hidden_states=ehs, class_labels=add,
                                attention_mask=dmask).sample
    got = m.decoder.apply({"params": m.params["decoder"]}, jnp.asarray(xi.transpose(0, 2, 3, 1)),
                          t, clip_emb=emb, text_states=states, text_emb=x, text_mask=mask)
    np.testing.assert_allclose(got, want.numpy().transpose(0, 2, 3, 1), atol=1e-4)


def test_whole_pipeline_matches_with_same_noise(karlo, monkeypatch):
    import diffusers.schedulers.scheduling_unclip as su

    from unclip_jax.pipelines.text_to_image import text_to_image

    m, pipe = karlo["model"], karlo["pipe"]
    prompts = ["a blue square"]
    b, key = 1, jax.random.PRNGKey(3)
    ours = text_to_image(m, prompts, key, prior_steps=STEPS, decoder_steps=STEPS,
                         sr_steps=STEPS)
    k_prior, k_rest = jax.random.split(key)
    k_dec, k_sr = jax.random.split(k_rest)
    p0, pn = tcd._stage_noise(k_prior, (b, tcd.D), STEPS)
    d0, dn = tcd._stage_noise(k_dec, (b, tcd.DEC, tcd.DEC, 3), STEPS)
    s0, sn = tcd._stage_noise(jax.random.split(k_sr, 1)[0], (b, tcd.SR, tcd.SR, 3), STEPS)
    nchw = lambda a: torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2)))  # noqa
    queue = [torch.from_numpy(np.array(a)) for a in pn] + [nchw(a) for a in dn + sn]
    monkeypatch.setattr(su, "randn_tensor", lambda *a, **k: queue.pop(0))
    with torch.no_grad():
        want = pipe(prompts, prior_num_inference_steps=STEPS, decoder_num_inference_steps=STEPS,
                    super_res_num_inference_steps=STEPS,
                    prior_latents=torch.from_numpy(np.array(p0)), decoder_latents=nchw(d0),
                    super_res_latents=nchw(s0), output_type="np").images
    assert not queue
    got = np.clip(np.asarray(ours["images"]) * 0.5 + 0.5, 0.0, 1.0)
    np.testing.assert_allclose(got, want, atol=1e-3)


def test_karlo_errors_name_the_keys(karlo):
    m = karlo["model"]
    ckpt = torch.load(str(karlo["src"] / KARLO_FILES["sr"]), weights_only=True)["state_dict"]
    sd = {k[len("model_first_steps."):]: v.numpy() for k, v in ckpt.items()
          if k.startswith("model_first_steps.")}
    convert_karlo_unet(sd, m.sr_config[0])
    bad = dict(sd)
    bad.pop("out.2.bias")
    bad["input_blocks.1.0.in_layers.2.weight"] = bad["input_blocks.1.0.in_layers.2.weight"][:8]
    bad["label_emb.weight"] = np.zeros((4, 4), np.float32)
    with pytest.raises(CheckpointMismatchError) as e:
        convert_karlo_unet(bad, m.sr_config[0])
    msg = str(e.value)
    for part in ("missing checkpoint key out.2.bias", "label_emb.weight",
                 "shape mismatch for input_blocks.1.0.in_layers.2.weight",
                 "out_conv/bias"):
        assert part in msg, (part, msg)
    from unclip_jax.convert.cli import convert_main

    assert convert_main(["karlo", str(karlo["root"] / "nowhere"),
                         str(karlo["root"] / "x")]) == 1


def test_convert_hf_clip_and_openai_clip_cli(karlo):
    from unclip_jax.convert.cli import convert_main, load_clip_dir

    root = karlo["root"]
    assert convert_main(["hf-clip", str(root / "clip"), str(root / "clip_dir")]) == 0
    params, cfg, tok = load_clip_dir(str(root / "clip_dir"))
    assert os.path.isfile(os.path.join(tok, "vocab.json"))
    assert cfg == karlo["model"].clip_config
    a, b = flatten(params), flatten(karlo["model"].params["clip"])
    assert set(a) == set(b)
    for k in a:
        np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]), err_msg="/".join(k))
    assert float(params["logit_scale"]) == 2.0
    assert convert_main(["openai-clip", str(root / "missing.pt"), str(root / "o")]) == 1
