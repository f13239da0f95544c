"""benchmarks/quality_emoji.py end to end on the tiny random unCLIP and a tiny random
evaluation CLIP (another config), with fake concept data built here; plus the pieces of
unclip_jax/eval/quality.py and the trade-off plot."""
import importlib.util
import json
import os

import numpy as np
import pytest
from PIL import Image

from unclip_jax import config as cfg_lib
from unclip_jax.eval import plots, quality
from unclip_jax.eval.clip_features import load_eval_clip, same_clip, tokenizer_dir_for

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

EVAL_CLIP_CONFIG = '''
import ml_collections


def get_config():
    c = ml_collections.ConfigDict()
    c.name = "tiny_eval_clip"
    c.clip = dict(projection_dim=24,
                  text_config=dict(vocab_size=49408, hidden_size=24, intermediate_size=48,
                                   num_hidden_layers=1, num_attention_heads=2,
                                   max_position_embeddings=77, projection_dim=24),
                  vision_config=dict(image_size=32, patch_size=16, hidden_size=24,
                                     intermediate_size=48, num_hidden_layers=1,
                                     num_attention_heads=2, projection_dim=24))
    return c
'''
COLORS = ["red", "green", "blue", "yellow", "purple", "orange", "black", "white"]


def fake_split(offset: int, n_concepts: int = 8, per_concept: int = 3, size: int = 32):
    """Concepts = coloured squares of one hue; images vary in square size and position."""
    rng = np.random.default_rng(offset)
    examples, pool = [], {}
    for c in range(n_concepts):
        name = f"c{offset + c}"
        pool[name] = f"a {COLORS[c % len(COLORS)]} square number {offset + c}"
        colour = rng.integers(0, 256, 3)
        for _ in range(per_concept):
            im = np.full((size, size, 3), 255, np.uint8)
            s = int(rng.integers(8, 24))
            y, x = rng.integers(0, size - s, 2)
            im[y:y + s, x:x + s] = colour
            examples.append({"image": im, "concept": name.encode()})  # bytes, as tfds gives
    return examples, pool


def _load_script():
    path = os.path.join(ROOT, "benchmarks", "quality_emoji.py")
    spec = importlib.util.spec_from_file_location("quality_emoji_bench", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_concept_set_selection_and_real_halves():
    examples, pool = fake_split(0, n_concepts=6, per_concept=3)
    cs = quality.concept_set("train", examples, pool, num_concepts=4, seed=1)
    assert len(cs.concepts) == 4 and cs.concepts == sorted(cs.concepts)
    assert cs.prompts == [pool[c] for c in cs.concepts]
    assert len(cs.pool_concepts) == 6  # the distractor pool is the whole split
    ref, ceil, lr, lc = quality.split_real(cs)
    assert len(ref) == 4 * 2 and len(ceil) == 4 * 1 and set(lr) == set(lc) == set(cs.concepts)
    again = quality.concept_set("train", examples, pool, num_concepts=4, seed=1)
    assert again.concepts == cs.concepts
    with pytest.raises(ValueError, match="caption pool"):
        quality.ConceptSet("x", ["nope"], ["p"], [ref[:1]], ["c0"], ["a"])


def test_tradeoff_plot_pil(tmp_path):
    def row(m, g, fid, r):
        return quality.Row("train", m, g, 8, r, fid, 20.0)
    res = {s: {"rows": [row("real", None, 0.1, 0.9)],
               "sweep": [row("unclip", 1.0, 0.5, 0.2), row("unclip", 3.0, 0.7, 0.6),
                         row("caption_only", 1.0, 0.4, 0.1), row("caption_only", 3.0, 0.9, 0.3)]}
           for s in ("train", "test")}
    # the main table's row of a swept method joins its line (no duplicate point)
    res["train"]["rows"].append(row("unclip", 2.0, 0.6, 0.4))
    res["train"]["rows"].append(row("unclip", 3.0, 0.7, 0.6))
    lines, real = plots._series(res["train"])
    assert [g for g, _, _ in lines["unclip"]] == [1.0, 2.0, 3.0] and real == (0.1, 0.9)
    path = plots.tradeoff_plot(res, str(tmp_path / "t.png"), backend="pil")
    im = np.asarray(Image.open(path).convert("RGB"))
    assert im.shape == (380, 960, 3)
    for col in (plots.COLORS["unclip"], plots.COLORS["caption_only"], plots.COLORS["real"]):
        assert (im == np.array(col, np.uint8)).all(-1).sum() > 20  # every series is drawn


def test_emoji16_config_is_emoji_with_a_16px_decoder_and_two_upsamplers():
    """experiments/emoji16.py (round 11) changes only the decoder's size and depth and the
    upsampler list; its decoder has the weights of emoji.py's 4-level decoder (round 10's: no
    parameter depends on the image size, attention sits on the same level) and both upsamplers
    the weights of emoji.py's one."""
    import jax

    from unclip_jax.pipelines import model as model_lib

    base = cfg_lib.load_config_file(os.path.join(ROOT, "experiments", "emoji.py"))
    c16 = cfg_lib.load_config_file(os.path.join(ROOT, "experiments", "emoji16.py"))
    for k in base:
        if k not in ("decoder", "sr", "name"):
            assert cfg_lib.to_json(base[k]) == cfg_lib.to_json(c16[k]), k
    assert c16.name != base.name
    assert cfg_lib.decoder_config(c16).image_size == 16
    assert [s.image_size for s in cfg_lib.sr_configs(c16)] == [32, 64]
    shapes = lambda cfg: jax.tree.map(lambda x: x.shape, model_lib._abstract_params(cfg))  # noqa: E731
    with base.unlocked():
        base.decoder.channel_mult = (1, 2, 2, 3)
    a, b = shapes(base), shapes(c16)
    assert a["decoder"] == b["decoder"]
    assert b["sr"] == [a["sr"][0], a["sr"][0]]


def test_eval_clip_config_differs_from_the_model_clip():
    model_cfg = cfg_lib.load_config_file(os.path.join(ROOT, "experiments", "emoji.py"))
    eval_cfg = cfg_lib.load_config_file(os.path.join(ROOT, "experiments",
                                                     "emoji_eval_clip.py"))
    a, b = cfg_lib.clip_config(model_cfg), cfg_lib.clip_config(eval_cfg)
    assert a.vision_config.patch_size != b.vision_config.patch_size
    assert a.vision_config.hidden_size != b.vision_config.hidden_size
    assert a.projection_dim != b.projection_dim
    assert a.text_config.max_position_embeddings == b.text_config.max_position_embeddings
    assert tokenizer_dir_for(eval_cfg) == tokenizer_dir_for(model_cfg)
    assert eval_cfg.name != model_cfg.name
    # everything but the CLIP (and the CLIP run's seed) is emoji.py's
    for k in model_cfg:
        if k not in ("clip", "name", "train"):
            assert cfg_lib.to_json(model_cfg[k]) == cfg_lib.to_json(eval_cfg[k]), k
    if "train" in model_cfg:
        assert eval_cfg.train.clip.seed != model_cfg.train.clip.seed


def _conditioned_tiny_model():
    """The tiny random unCLIP with the zero-initialised kernels of its decoder and upsampler
    (GLIDE zero-inits every residual / attention output and the last conv) made small random
    values, so that the images depend on the conditioning and the rows can differ."""
    import jax

    from unclip_jax import cli
    from unclip_jax.pipelines import model as model_lib

    base = cli.load_model("random:tiny")
    rng = np.random.default_rng(0)
    noise = lambda x: (np.asarray(x) + 0.05 * rng.standard_normal(np.shape(x)).astype(  # noqa
        np.float32) if np.ndim(x) >= 2 and not np.any(np.asarray(x)) else x)
    params = dict(base.params, decoder=jax.tree.map(noise, base.params["decoder"]),
                  sr=jax.tree.map(noise, base.params["sr"]))
    return model_lib.UnCLIP(base.config, params, random_weights=True, source="random:tiny+")


def test_quality_benchmark_end_to_end(tmp_path):
    cfg = tmp_path / "tiny_eval_clip.py"
    cfg.write_text(EVAL_CLIP_CONFIG)
    data = {"train": fake_split(0), "test": fake_split(100)}
    out_dir = tmp_path / "out"
    lines = []
    bench = _load_script()
    out = bench.main(["--model", "random:tiny", "--eval-clip", f"random:{cfg}",
                      "--num-concepts", "4", "--samples-per-concept", "2",
                      "--guidance-sweep", "1,3", "--batch-size", "8", "--prior-steps", "2",
                      "--decoder-steps", "2", "--sr-steps", "2", "--grid-per-prompt", "1",
                      "--out-dir", str(out_dir)], data=data, model=_conditioned_tiny_model(),
                     log=lines.append)
    res = out["results"]
    assert set(res) == {"train", "test"}
    for r in res.values():
        rows = {(x["method"], x["guidance"]) for x in r["rows"]}
        # tiny's decoder guidance: 3
        assert rows == {("real", None), ("real_sr", None), ("unclip", 3.0),
                        ("caption_only", 3.0), ("text_emb", 3.0), ("image_emb", 3.0)}
        assert {(x["method"], x["guidance"]) for x in r["sweep"]} == {
            (m, g) for m in ("unclip", "caption_only") for g in (1.0, 3.0)}
        assert r["num_distractors"] == 7  # 8 concepts in the fake pool
        assert r["image_size"] == 32 and r["score_at"] == "final"
        for x in r["rows"] + r["sweep"]:
            assert 0.0 <= x["r_precision"] <= 1.0 and np.isfinite(x["clip_fid"])
            assert x["clip_fid"] >= 0
            assert x["n"] == (4 if x["method"] in ("real", "real_sr") else 8)
        # common random numbers: the table row at guidance 3 is the sweep's point at 3
        tab = next(x for x in r["rows"] if x["method"] == "unclip")
        sw = next(x for x in r["sweep"] if x["method"] == "unclip" and x["guidance"] == 3.0)
        assert tab["clip_fid"] == sw["clip_fid"]
        # the rows really are different conditionings / guidance scales
        fid = {(x["method"], x["guidance"]): x["clip_fid"] for x in r["rows"] + r["sweep"]}
        assert len({fid[(m, 3.0)] for m in quality.METHODS}) == 4
        assert fid[("unclip", 1.0)] != fid[("unclip", 3.0)]
    table = (out_dir / "results.md").read_text()
    assert "real images (ceiling)" in table and "caption only" in table
    assert "CLIP text emb" in table and "| test |" in table and "Goal: " in table
    assert "oracle prior" in table and "decoder ceiling" in table
    assert json.loads((out_dir / "results.json").read_text())["results"]["train"]["rows"]
    plot = np.asarray(Image.open(out_dir / "tradeoff.png"))
    assert plot.ndim == 3 and plot.shape[1] > plot.shape[0]
    assert not (out_dir / "samples_image_emb.png").exists()  # grids have prompts only
    for m in quality.PROMPT_METHODS:
        grid = Image.open(out_dir / f"samples_{m}.png")
        assert grid.size[1] > grid.size[0]  # one row per fixed prompt, one column
    assert (out_dir / "samples_prompts.txt").read_text().split("\n")[:2] == list(
        quality.GRID_PROMPTS[:2])
    assert any("R-precision" in ln for ln in lines)


def test_refuses_to_score_with_the_models_own_clip(tmp_path):
    from unclip_jax import cli

    model = cli.load_model("random:tiny")
    assert same_clip(model.params["clip"], model.params["clip"])
    ev = load_eval_clip("random:" + os.path.join(ROOT, "experiments", "tiny.py"), seed=0)
    assert not same_clip(model.params["clip"], ev.params)  # same config, other seed


def test_image_emb_row_is_conditioned_on_the_real_images():
    """The oracle-prior row decodes from the model-CLIP embeddings of the given real images:
    the same images give the same samples, other images other samples; it refuses to run
    without images."""
    import jax

    model = _conditioned_tiny_model()
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    b = 255 - a
    kw = dict(batch_size=2, prior_steps="2", decoder_steps="2", sr_steps="2",
              score_at="decoder")
    prompts = ["a", "b", "c"]
    gen = lambda ims: quality.Generator(model, prompts, jax.random.key(0),  # noqa: E731
                                        cond_images=ims, **kw)
    out_a = gen(a).decode("image_emb", 3.0)
    assert out_a.shape[0] == 3  # the padded last batch is cut
    np.testing.assert_array_equal(out_a, gen(a.copy()).decode("image_emb", 3.0))
    assert not np.array_equal(out_a, gen(b).decode("image_emb", 3.0))
    with pytest.raises(ValueError, match="cond_images"):
        quality.Generator(model, prompts, jax.random.key(0), **kw).decode("image_emb", 3.0)
    with pytest.raises(ValueError, match="one per prompt"):
        gen(a[:2])


def test_quality_benchmark_methods_subset(tmp_path):
    """--methods keeps only the rows asked for (a large-n run of unCLIP alone); a bad name is
    refused before anything runs."""
    cfg = tmp_path / "tiny_eval_clip.py"
    cfg.write_text(EVAL_CLIP_CONFIG)
    bench = _load_script()
    args = ["--model", "random:tiny", "--eval-clip", f"random:{cfg}", "--splits", "train",
            "--num-concepts", "4", "--samples-per-concept", "1", "--guidance-sweep", "",
            "--batch-size", "4", "--prior-steps", "2", "--decoder-steps", "2", "--sr-steps",
            "2", "--grid-per-prompt", "0", "--out-dir", str(tmp_path / "out")]
    out = bench.main(args + ["--methods", "unclip"], data={"train": fake_split(0)},
                     model=_conditioned_tiny_model(), log=lambda m: None)
    assert [x["method"] for x in out["results"]["train"]["rows"]] == ["real", "real_sr",
                                                                         "unclip"]
    with pytest.raises(SystemExit):
        bench.build_parser().parse_args(args + ["--methods", "unclip,dalle"])
    # settings sweeps (tune_sampling_emoji.py) leave the ceiling rows out
    import jax

    examples, pool = fake_split(0)
    cs = quality.concept_set("train", examples, pool, num_concepts=4, seed=0)
    res = quality.evaluate_split(
        _conditioned_tiny_model(), load_eval_clip(f"random:{cfg}", seed=1), cs,
        jax.random.key(0), samples_per_concept=1, methods=("unclip",), batch_size=4,
        prior_steps="2", decoder_steps="2", sr_steps="2", log=lambda m: None, ceilings=False)
    assert [r.method for r in res["rows"]] == ["unclip"]


def test_real_sr_row_shrinks_to_the_decoder_size_and_runs_every_upsampler(monkeypatch):
    """upsample_real: real images -> the decoder's size -> upsampler 0, 1, ... in turn (here
    stand-in upsamplers that resize bicubically and tag their index), padded batches cut."""
    import jax

    from unclip_jax.pipelines import stages
    from unclip_jax.utils.images import from_uint8, to_uint8

    model = _conditioned_tiny_model()
    calls = []

    def fake_upsample(m, key, images, index, *, steps=None):
        calls.append((index, images.shape, steps))
        size = m.sr_config[index].image_size
        up = stages.resize_uint8(to_uint8(np.asarray(images)), size)
        return from_uint8(up)

    monkeypatch.setattr(stages, "upsample", fake_upsample)
    rng = np.random.default_rng(0)
    real = rng.integers(0, 256, (5, model.output_size, model.output_size, 3), dtype=np.uint8)
    out = quality.upsample_real(model, real, jax.random.key(0), sr_steps="3", batch_size=2)
    n_sr = len(model.upsamplers)
    assert n_sr >= 1 and out.shape == real.shape and out.dtype == np.uint8
    # 3 batches of 2 (the last padded) through every upsampler, decoder-size input first
    assert [c[0] for c in calls] == list(range(n_sr)) * 3
    assert calls[0][1] == (2, model.decoder_size, model.decoder_size, 3)
    assert all(c[2] == "3" for c in calls)
    want = stages.resize_uint8(real, model.decoder_size)
    for cfg in model.sr_config:
        want = stages.resize_uint8(to_uint8(from_uint8(want)), cfg.image_size)
    np.testing.assert_array_equal(out, want)
    # a shrunk-and-regrown image is not the original (the row measures a real loss)
    assert not np.array_equal(out, real)


def test_tune_sampling_settings_parse_and_apply():
    """tune_sampling_emoji.py: settings parse to typed (stage, key) overrides, apply to a
    model's diffusion config and restore; bad stages / keys are refused by name."""
    import importlib.util

    from unclip_jax import cli

    spec = importlib.util.spec_from_file_location(
        "tune_sampling_emoji", os.path.join(ROOT, "benchmarks", "tune_sampling_emoji.py"))
    tune = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tune)
    s = tune.parse_setting("prior.num_candidates=4, decoder.guidance=2.5,sr.sample_steps=15")
    assert s == {("prior", "num_candidates"): 4, ("decoder", "guidance"): 2.5,
                 ("sr", "sample_steps"): 15}
    assert tune.parse_setting("") == {}
    with pytest.raises(ValueError, match="unknown stage"):
        tune.parse_setting("clip.guidance=1")
    with pytest.raises(ValueError, match="STAGE.KEY=VALUE"):
        tune.parse_setting("guidance=1")
    config = cli.load_model("random:tiny").config
    before = config.diffusion.decoder.guidance
    old = tune.apply_setting(config, s)
    assert config.diffusion.decoder.guidance == 2.5
    assert config.diffusion.sr.sample_steps == "15"  # string-typed keys stay strings
    tune.apply_setting(config, old)
    assert config.diffusion.decoder.guidance == before
    with pytest.raises(KeyError, match="has no key 'nope'"):
        tune.apply_setting(config, {("prior", "nope"): 1})
