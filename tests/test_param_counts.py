"""Parameter counts of the Karlo- and paper-scale configs (jax.eval_shape: no memory).

Karlo scale must hold Karlo's released checkpoints exactly; the numbers below are those of the
released models, which tests/test_unet.py and tests/test_prior.py also check against the same
architectures built in diffusers. CLIP ViT-L/14 is checked here against transformers' CLIPModel
built on the meta device. Paper scale must be within 15% of the totals the paper states.
"""
import pathlib

import pytest

from unclip_jax import config as cfg_lib
from unclip_jax.param_counts import count_models

ROOT = pathlib.Path(__file__).resolve().parents[1]

KARLO = {
    "prior": 1_022_030_080,    # prior_1B_vit_l (incl. clip_mean / clip_std)
    "decoder": 893_318_086,    # decoder_900M_vit_l (incl. text projection and cf_param)
    "sr1": 691_579_523,        # improved_sr_64_256_1.4B: super_res_first
    "sr2": 691_579_523,        # ... and super_res_last
}
PAPER = {"prior": 1.0e9, "decoder": 3.5e9, "sr1": 700e6, "sr2": 300e6}


@pytest.fixture(scope="module")
def karlo_counts():
    return count_models(cfg_lib.load_config_file(str(ROOT / "experiments" / "karlo.py")))


def test_karlo_scale_matches_released_checkpoints(karlo_counts):
    for name, n in KARLO.items():
        assert karlo_counts[name] == n, (name, karlo_counts[name], n)


def test_karlo_clip_matches_transformers_vit_l14(karlo_counts):
    import accelerate
    import transformers

    config = cfg_lib.load_config_file(str(ROOT / "experiments" / "karlo.py"))
    hf_cfg = transformers.CLIPConfig(
        text_config=dict(config.clip.text_config), vision_config=dict(config.clip.vision_config),
        projection_dim=config.clip.projection_dim)
    with accelerate.init_empty_weights():
        hf = transformers.CLIPModel(hf_cfg)
    n_hf = sum(p.numel() for p in hf.parameters())
    assert karlo_counts["clip"] == n_hf
    assert 420e6 < n_hf < 435e6  # ViT-L/14 CLIP: ~428M


def test_paper_scale_within_15_percent_of_published():
    counts = count_models(cfg_lib.load_config_file(str(ROOT / "experiments" / "paper.py")))
    for name, published in PAPER.items():
        assert abs(counts[name] - published) / published < 0.15, (name, counts[name], published)
