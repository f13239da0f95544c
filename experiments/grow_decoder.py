"""Write a model dir whose decoder adds resolution levels at the bottom of a trained model's
decoder, the trained weights transplanted (``unclip_jax/train/transplant.py``): train it on
with ``--config.train.decoder.init_from=OUT`` and the same ``--config.decoder.*`` overrides.

    python experiments/grow_decoder.py --model unclip_jax/assets/emoji_model --out R9/grown \\
        --config experiments/emoji.py "--config.decoder.channel_mult=(1,2,2,3)"
    unclip train decoder --config experiments/emoji.py "--config.decoder.channel_mult=(1,2,2,3)" \\
        --workdir R9/decoder --data R/embeddings --config.train.decoder.init_from=R9/grown ...

Only the decoder changes (CLIP, prior, upsamplers, PCA and tokenizer are copied); the model's
inpainting decoder is left out (re-tune it from the trained decoder: ``unclip train inpaint``).
Overrides may only touch ``decoder.*``: the rest of the config must be the model's.
"""
from __future__ import annotations

import argparse
import json
import sys

import jax
from flax import linen as nn

from unclip_jax import config as cfg_lib
from unclip_jax.models import unet as unet_lib
from unclip_jax.pipelines import model as model_lib
from unclip_jax.train.cli import load_config, split_overrides
from unclip_jax.train.transplant import transplant_unet_params


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    rest, overrides = split_overrides(argv)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="trained model dir")
    ap.add_argument("--config", required=True, help="config file of the grown model")
    ap.add_argument("--out", required=True, help="new model dir (must not exist)")
    ap.add_argument("--seed", type=int, default=0, help="init of the fresh leaves")
    args = ap.parse_args(rest)
    bad = [k for k in overrides if not k.startswith("decoder.")]
    if bad:
        ap.error(f"only --config.decoder.* overrides are allowed, got {bad}")
    config = load_config(args.config, overrides)
    old = model_lib.load(args.model)
    was, now = json.loads(cfg_lib.to_json(old.config)), json.loads(cfg_lib.to_json(config))
    for sec in ("clip", "prior", "sr", "diffusion"):
        if was.get(sec) != now.get(sec):
            ap.error(f"config section {sec!r} differs from {args.model}'s; only the decoder may "
                     "change")
    new_cfg, old_cfg = cfg_lib.decoder_config(config), old.decoder_config
    fresh = nn.meta.unbox(unet_lib.init_unet(new_cfg, jax.random.key(args.seed))["params"])
    dec, report = transplant_unet_params(old.params["decoder"], old_cfg, fresh, new_cfg)
    print(f"decoder {tuple(old_cfg.channel_mult)} -> {tuple(new_cfg.channel_mult)}: "
          f"{unet_lib.count_params(old.params['decoder']):,} -> "
          f"{unet_lib.count_params(dec):,} parameters; {report.summary(old.params['decoder'])}")
    print("fresh:", ", ".join(sorted({k.split("/")[0] for k in report.fresh})))
    params = {k: v for k, v in old.params.items() if k != "inpaint"}
    params["decoder"] = dec
    new = model_lib.UnCLIP(config, params, tokenizer_dir=old.tokenizer_dir, pca=old.pca,
                           source=f"grown from {args.model}")
    model_lib.save(new, args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
