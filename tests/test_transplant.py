"""A decoder grown by a resolution level at the bottom starts from a trained one's weights
(``unclip_jax/train/transplant.py``, ``experiments/grow_decoder.py``)."""
import os
import runpy

import jax
import numpy as np
import pytest
from flax import linen as nn

from unclip_jax import config as cfg_lib
from unclip_jax.models import unet as unet_lib
from unclip_jax.pipelines import model as model_lib
from unclip_jax.train.cli import load_config
from unclip_jax.train.loop import SyntheticSource, train
from unclip_jax.train.transplant import TransplantError, transplant_unet_params

HERE = os.path.dirname(__file__)
MICRO = os.path.join(HERE, "fixtures", "micro.py")
FIXTURE_MODEL = os.path.join(HERE, "fixtures", "micro_model")
GROW = {"decoder.channel_mult": "(1,2)"}


def _flat(tree):
    return {"/".join(str(getattr(k, "key", k)) for k in p): np.asarray(v)
            for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_transplant_moves_every_level_to_its_new_place():
    trained = model_lib.load(FIXTURE_MODEL)
    old_cfg = trained.decoder_config
    new_cfg = cfg_lib.decoder_config(load_config(MICRO, GROW))
    fresh = nn.meta.unbox(unet_lib.init_unet(new_cfg, jax.random.key(1))["params"])
    out, rep = transplant_unet_params(trained.params["decoder"], old_cfg, fresh, new_cfg)
    old, new, ini = _flat(trained.params["decoder"]), _flat(out), _flat(fresh)
    assert jax.tree.map(np.shape, out) == jax.tree.map(np.shape, fresh)
    shift = 1 * (old_cfg.num_res_blocks + 1)  # one level added: its up blocks come first
    for k, v in old.items():
        nk = k
        if k.startswith("output_blocks_"):
            i = int(k.split("_")[2])
            nk = k.replace(f"output_blocks_{i}_", f"output_blocks_{i + shift}_", 1)
        if k in rep.dropped:
            assert nk not in new or new[nk].shape != v.shape
        else:
            np.testing.assert_array_equal(new[nk], v.astype(new[nk].dtype), err_msg=k)
    # the stem, the old level's down blocks, its non-first up blocks, the conditioning and the
    # head are all copied; the middle (now wider, at 4 px) starts fresh
    for must in ("conv_in", "input_blocks_1_res", f"output_blocks_{shift + 1}_res",
                 "out_conv", "clip_cond"):
        assert any(k.startswith(must) for k in rep.copied), must
    assert rep.fresh and all(not k.startswith(("conv_in", "out_")) for k in rep.fresh)
    for k in rep.fresh:
        np.testing.assert_array_equal(new[k], ini[k])
    assert any(k.startswith("middle_res_0") for k in rep.fresh)
    assert len(rep.copied) + len(rep.fresh) == len(new)
    # every trained leaf is either copied or reported dropped
    assert len(rep.copied) + len(rep.dropped) == len(old)


def test_transplant_refuses_what_is_not_an_added_level():
    trained = model_lib.load(FIXTURE_MODEL)
    old_cfg = trained.decoder_config
    for bad in ({"decoder.channel_mult": "(2,)"}, {"decoder.channel_mult": "(2,1)"},
                {"decoder.model_channels": "16", "decoder.channel_mult": "(1,2)"}):
        new_cfg = cfg_lib.decoder_config(load_config(MICRO, bad))
        fresh = nn.meta.unbox(unet_lib.abstract_params(new_cfg))
        with pytest.raises(TransplantError):
            transplant_unet_params(trained.params["decoder"], old_cfg, fresh, new_cfg)


def test_grow_decoder_script_writes_a_model_dir_training_continues_from(tmp_path, capsys):
    out = str(tmp_path / "grown")
    mod = runpy.run_path(os.path.join(HERE, "..", "experiments", "grow_decoder.py"))
    assert mod["main"](["--model", FIXTURE_MODEL, "--config", MICRO, "--out", out,
                        "--config.decoder.channel_mult=(1,2)"]) == 0
    assert "leaves copied" in capsys.readouterr().out
    grown = model_lib.load(out)
    assert tuple(grown.decoder_config.channel_mult) == (1, 2)
    assert not grown.has_inpaint_decoder
    src = model_lib.load(FIXTURE_MODEL)
    for k in ("clip", "prior"):
        for a, b in zip(jax.tree.leaves(grown.params[k]), jax.tree.leaves(src.params[k])):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # the trainer starts from it with the same override, shapes equal (no init_partial)
    cfg = load_config(MICRO, {**GROW, "train.decoder.init_from": out})
    res = train("decoder", cfg, str(tmp_path / "w"), SyntheticSource(4, 16, seed=0,
                embeddings=(8, 16, 8)), steps=0, progress=False, console=False)
    got = _flat(jax.device_get(res.state.params))
    want = _flat(grown.params["decoder"])
    for k, v in want.items():
        np.testing.assert_array_equal(got[k], v.astype(got[k].dtype), err_msg=k)
    # only decoder.* may change
    with pytest.raises(SystemExit):
        mod["main"](["--model", FIXTURE_MODEL, "--config", MICRO, "--out",
                     str(tmp_path / "x"), "--config.prior.width=32"])


def test_export_refuses_an_inpainting_decoder_of_another_decoder_config(tmp_path):
    """A grown decoder with the old model's inpainting decoder is refused, not written."""
    from unclip_jax.train.export import ExportError, export_model

    grown = str(tmp_path / "grown")
    runpy.run_path(os.path.join(HERE, "..", "experiments", "grow_decoder.py"))["main"](
        ["--model", FIXTURE_MODEL, "--config", MICRO, "--out", grown,
         "--config.decoder.channel_mult=(1,2)"])
    cfg = load_config(MICRO, GROW)
    dirs = {"clip": FIXTURE_MODEL, "prior": FIXTURE_MODEL, "decoder": grown, "sr": FIXTURE_MODEL}
    with pytest.raises(ExportError, match="inpaint"):
        export_model(cfg, {**dirs, "inpaint": FIXTURE_MODEL}, str(tmp_path / "bad"))
    assert not os.path.exists(str(tmp_path / "bad"))
    out = export_model(cfg, dirs, str(tmp_path / "ok"))
    assert tuple(model_lib.load(out).decoder_config.channel_mult) == (1, 2)
