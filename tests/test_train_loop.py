"""The trainer: exact resume after SIGTERM / a crash, non-finite skipping and abort, metrics,
export to a model dir that loads and samples, `unclip embed`, the train CLI, and the committed
micro model dir that pins the model-dir format; eval every eval_every steps, gradient accumulation
through the trainer, real steps of every UNet stage, process-0-only logging, remote workdirs and
the CLI's user errors / exit codes.

Config: tests/fixtures/micro.py (one device, compiles shared through the persistent cache)."""
import functools
import json
import os
import re
import signal

import jax
import numpy as np
import pytest

from unclip_jax.config import ConfigError
from unclip_jax.train import export as export_lib
from unclip_jax.train import loop
from unclip_jax.train.cli import embed_main, load_config, train_main
from unclip_jax.train.loop import NonFiniteLossError, SyntheticSource, train

HERE = os.path.dirname(__file__)
MICRO = os.path.join(HERE, "fixtures", "micro.py")
FIXTURE_MODEL = os.path.join(HERE, "fixtures", "micro_model")


def _cfg(**overrides):
    return load_config(MICRO, overrides)


def _src(**kw):
    return SyntheticSource(4, 16, seed=0, embeddings=(8, 16, 8), **kw)


def _host(tree):
    return jax.tree.map(lambda a: np.asarray(jax.device_get(a)), tree)


def _assert_bitwise(a, b):
    la, ta = jax.tree.flatten(a)
    lb, tb = jax.tree.flatten(b)
    assert ta == tb
    for x, y in zip(la, lb):
        np.testing.assert_array_equal(x, y)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """20 prior steps in one go (save_every 5, log_every 5)."""
    wd = str(tmp_path_factory.mktemp("straight"))
    res = train("prior", _cfg(), wd, _src(), steps=20, progress=False, console=False)
    return res, _host(res.state), wd


def test_resume_after_sigterm_and_crash_is_bitwise_exact(straight, tmp_path):
    ref, ref_state, _ = straight
    assert ref.step == 20 and not ref.preempted
    wd = str(tmp_path / "run")

    def sigterm_at_7(step, metrics):
        if step == 7:
            os.kill(os.getpid(), signal.SIGTERM)  # the guard's real handler

    before = signal.getsignal(signal.SIGTERM)
    part = train("prior", _cfg(), wd, _src(), steps=20, progress=False, console=False,
                 callbacks=[sigterm_at_7])
    assert part.preempted and part.step == 7
    assert signal.getsignal(signal.SIGTERM) == before
    steps = sorted(int(d) for d in os.listdir(wd) if d.isdigit())
    assert steps == [5, 7]

    class Crash(Exception):
        pass

    def crash_at_13(step, metrics):  # like kill -9: nothing saved after step 10
        if step == 13:
            raise Crash()

    with pytest.raises(Crash):
        train("prior", _cfg(), wd, _src(), steps=20, progress=False, console=False,
              callbacks=[crash_at_13])
    assert max(int(d) for d in os.listdir(wd) if d.isdigit()) == 10  # lost < one interval

    final = train("prior", _cfg(), wd, _src(), steps=20, progress=False, console=False)
    assert final.step == 20 and not final.preempted
    _assert_bitwise(_host(final.state), ref_state)
    _assert_bitwise(_host(final.frozen), _host(ref.frozen))


def test_metrics_jsonl(straight):
    _, _, wd = straight
    with open(os.path.join(wd, loop.METRICS_FILE)) as f:
        records = [json.loads(line) for line in f]
    assert [r["step"] for r in records] == [5, 10, 15, 20]
    for r in records:
        for k in loop.METRIC_KEYS:
            assert k in r and np.isfinite(r[k]), (k, r)
        assert r["images_per_sec"] > 0 and r["lr"] > 0 and r["skipped"] == 0
    assert records[-1]["loss"] < records[0]["loss"]  # it learns something


def test_progress_bar_and_console_lines(tmp_path, capsys):
    """progress=True draws a tqdm bar ('train prior', up to steps/steps) on stderr, and the
    console lines carry the logged metrics (loss, lr, grad_norm, images_per_sec); the CLI's
    `unclip embed` shows its own bar ('embed') unless --no-progress."""
    cfg = _cfg(**{"train.prior.log_every": "2"})
    train("prior", cfg, str(tmp_path / "bar"), _src(), steps=4, progress=True, console=True)
    err = capsys.readouterr().err
    assert "train prior" in err and "4/4" in err, err[-2000:]
    lines = [ln for ln in err.replace("\r", "\n").splitlines() if ln.startswith("step=")]
    assert [ln.split()[0] for ln in lines] == ["step=2", "step=4"], lines
    for key in ("loss=", "lr=", "grad_norm=", "images_per_sec="):
        assert all(key in ln for ln in lines), (key, lines)
    assert embed_main(["--model", FIXTURE_MODEL, "--data", "synthetic", "--out",
                       str(tmp_path / "emb"), "--max-examples", "6", "--batch-size", "3"]) == 0
    err = capsys.readouterr().err
    assert "embed" in err and "6/6" in err, err[-2000:]


def test_nonfinite_loss_is_skipped_logged_and_aborts_after_k(tmp_path):
    wd = str(tmp_path / "nan")
    res = train("prior", _cfg(), wd, _src(nan_batches=[2, 3]), steps=6, progress=False,
                console=False)
    assert res.step == 6 and int(res.state.skipped) == 2
    with open(os.path.join(wd, loop.METRICS_FILE)) as f:
        records = [json.loads(line) for line in f]
    events = [r for r in records if r.get("event") == "nonfinite_skipped"]
    assert [(e["step"], e["in_a_row"], e["loss"]) for e in events] == [(3, 1, "nan"),
                                                                      (4, 2, "nan")]
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(_host(res.state.params)))
    # max_nonfinite = 3 in the micro config
    with pytest.raises(NonFiniteLossError, match="3 non-finite losses in a row"):
        train("prior", _cfg(), str(tmp_path / "nan2"), _src(nan_batches=[1, 2, 3]), steps=10,
              progress=False, console=False)


def test_export_loads_and_samples(straight, tmp_path):
    from unclip_jax.pipelines import model as model_lib
    from unclip_jax.pipelines.text_to_image import text_to_image

    ref, ref_state, wd = straight
    with pytest.raises(export_lib.ExportError, match="allow"):
        export_lib.export_model(_cfg(), {"prior": wd}, str(tmp_path / "refused"))
    # the other stages come from the committed micro model dir (a model dir works as a source;
    # allow_random would compile an init of every model)
    out = export_lib.export_model(
        _cfg(), {"prior": wd, "clip": FIXTURE_MODEL, "decoder": FIXTURE_MODEL,
                 "sr": FIXTURE_MODEL}, str(tmp_path / "model"))
    m = model_lib.load(out)
    assert not m.random_weights
    fixture = model_lib.load(FIXTURE_MODEL)
    _assert_bitwise(_host(m.params["decoder"]), _host(fixture.params["decoder"]))
    _assert_bitwise(_host(m.params["prior"]["params"]), ref_state.ema_params)
    _assert_bitwise(_host(m.params["prior"]["buffers"]), _host(ref.frozen["buffers"]))
    res = text_to_image(m, ["a red heart"], jax.random.PRNGKey(0), prior_steps="1",
                        decoder_steps="1", stop_after="decoder")
    assert res["images"].shape == (1, 8, 8, 3)
    assert np.all(np.isfinite(np.asarray(res["images"])))


def test_export_rejects_a_workdir_of_another_model(straight, tmp_path):
    _, _, wd = straight
    other = _cfg(**{"prior.width": "32"})
    with pytest.raises(export_lib.ExportError, match="prior.width"):
        export_lib.load_stage_params(other, "prior", wd)


@functools.lru_cache(maxsize=None)
def _fixture_expect():
    with open(os.path.join(FIXTURE_MODEL, "expected.json")) as f:
        return json.load(f)


def test_committed_micro_model_dir_loads():
    """Pins the model-dir format: a dir written by export_model (make_micro_model.py) must keep
    loading with the current code, with the same config, shapes and weights."""
    from unclip_jax.pipelines import model as model_lib

    exp = _fixture_expect()
    m = model_lib.load(FIXTURE_MODEL)
    assert m.config.name == "micro"
    assert m.decoder_size == 8 and m.output_size == 16
    assert m.clip_config.projection_dim == 8 and m.prior_config.num_text_tokens == 16
    assert not m.random_weights
    for stage, want in exp["param_stats"].items():
        tree = m.params["sr"][0] if stage == "sr0" else m.params[stage]
        leaves = jax.tree.leaves(tree)
        assert sum(int(np.prod(x.shape)) for x in leaves) == want["count"], stage
        np.testing.assert_allclose(sum(float(np.abs(np.asarray(x, np.float64)).sum())
                                       for x in leaves), want["abs_sum"], rtol=1e-6)


def test_embed_cli_writes_a_dataset_the_trainer_reads(tmp_path, monkeypatch):
    """... and joins the multi-process job first (on a pod each process embeds its own shard)."""
    from unclip_jax.parallel import mesh as mesh_lib

    calls = []
    monkeypatch.setattr(mesh_lib, "maybe_initialize_distributed", lambda: calls.append(1))
    out = str(tmp_path / "emb")
    assert embed_main(["--model", FIXTURE_MODEL, "--data", "synthetic", "--out", out,
                       "--max-examples", "10", "--batch-size", "4", "--no-progress"]) == 0
    assert calls == [1]
    ds = loop.EmbeddingDataset(out, batch_size=4, seed=0)
    assert ds.num_examples == 10 and ds.meta["num_examples"] == 10
    it = iter(ds)
    b = next(it)
    ref = _src().batch(0)
    for k in ("image", "image_emb", "text_emb", "text_states", "text_mask"):
        assert b[k].shape == ref[k].shape and b[k].dtype == ref[k].dtype, k
    assert np.all(np.abs(b["image"]) <= 1.0)
    mean, std = ds.clip_stats()
    assert mean.shape == (8,) and np.all(std > 0)
    # checkpointable position: a restored reader continues with the same batches
    next(it)
    state = ds.get_state()
    want = next(it)["image_emb"]
    ds2 = loop.EmbeddingDataset(out, batch_size=4, seed=0)
    ds2.set_state(state)
    np.testing.assert_array_equal(next(iter(ds2))["image_emb"], want)
    assert state["epoch"] == 0 and ds.get_state()["epoch"] == 1  # 10 // 4 = 2 per epoch


def test_train_cli(tmp_path):
    wd = str(tmp_path / "cli")
    assert train_main(["prior", "--config", MICRO, "--workdir", wd, "--steps", "3",
                       "--data", "synthetic", "--no-progress",
                       "--config.train.prior.log_every=1"]) == 0
    assert sorted(int(d) for d in os.listdir(wd) if d.isdigit()) == [3]
    with pytest.raises(ConfigError, match="unknown config key"):
        train_main(["prior", "--config", MICRO, "--workdir", wd, "--config.train.prior.nope=1"])
    # resuming with another schedule / model is refused, naming the key
    with pytest.raises(ConfigError, match="train.learning_rate") as info:
        train_main(["prior", "--config", MICRO, "--workdir", wd, "--steps", "4",
                    "--config.train.prior.learning_rate=0.5", "--no-progress"])
    # ... and the message says how to go on from the command line; following it works
    assert f"--config.train.prior.init_from={wd}" in str(info.value)
    wd2 = str(tmp_path / "cli2")
    assert train_main(["prior", "--config", MICRO, "--workdir", wd2, "--steps", "1",
                       "--data", "synthetic", "--no-progress",
                       "--config.train.prior.learning_rate=0.5",
                       f"--config.train.prior.init_from={wd}"]) == 0
    assert sorted(int(d) for d in os.listdir(wd2) if d.isdigit()) == [1]
    with pytest.raises(ConfigError, match="diffusion.schedule"):
        train_main(["prior", "--config", MICRO, "--workdir", wd, "--steps", "4",
                    "--config.diffusion.prior.schedule=linear", "--no-progress"])
    # ... but sampling-only defaults (guidance, sampler, steps) may change: resume and export
    new_sampling = ["--config.diffusion.prior.guidance=2.5",
                    "--config.diffusion.prior.sampler=ddim",
                    "--config.diffusion.prior.sample_steps=7"]
    assert train_main(["prior", "--config", MICRO, "--workdir", wd, "--steps", "4",
                       "--data", "synthetic", "--no-progress", *new_sampling]) == 0
    assert sorted(int(d) for d in os.listdir(wd) if d.isdigit())[-1] == 4
    other = _cfg(**{"diffusion.prior.guidance": "2.5", "diffusion.prior.sampler": "ddim"})
    export_lib.load_stage_params(other, "prior", wd)
    c = _cfg()
    c.train.prior.bogus = 1
    with pytest.raises(ConfigError, match="unknown key"):
        loop.train_config(c, "prior")


def test_override_types():
    c = _cfg(**{"train.prior.batch_size": "16", "train.prior.learning_rate": "2e-4",
                "train.sr.blur_sigma": "(0.3, 0.5)", "train.prior.ema_warmup": "true",
                "dtype": "bfloat16", "train.prior.mesh.data": "-1"})
    assert c.train.prior.batch_size == 16 and isinstance(c.train.prior.batch_size, int)
    assert c.train.prior.learning_rate == 2e-4
    assert tuple(c.train.sr.blur_sigma) == (0.3, 0.5)
    assert c.train.prior.ema_warmup is True and c.dtype == "bfloat16"
    assert c.train.prior.mesh.data == -1
    with pytest.raises(ConfigError, match="integer"):
        _cfg(**{"train.prior.batch_size": "many"})


def test_tfds_reader_feeds_embed_and_clip_training(tmp_path):
    """The real data pipeline (image-caption folder -> tfds array_record -> grain reader):
    `unclip embed` makes one pass over it; CLIP trains on it and stores the reader's state."""
    from PIL import Image

    from unclip_jax.data.image_caption import ImageCaptionConfig, ImageCaptionFolder

    folder = tmp_path / "imgs"
    folder.mkdir()
    colours = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255),
               "white": (255, 255, 255), "black": (0, 0, 0), "yellow": (255, 255, 0),
               "cyan": (0, 255, 255), "magenta": (255, 0, 255)}
    for name, rgb in colours.items():
        Image.new("RGB", (20, 20), rgb).save(folder / f"{name}.png")
        (folder / f"{name}.txt").write_text(f"a {name} square\nthe colour {name}\n")
    data_dir = str(tmp_path / "data")
    ImageCaptionFolder(folder=str(folder), data_dir=data_dir,
                       config=ImageCaptionConfig(name="s16", image_size=16)).download_and_prepare()
    spec = f"tfds:image_caption_folder/s16:train@{data_dir}"

    out = str(tmp_path / "emb")
    assert embed_main(["--model", FIXTURE_MODEL, "--data", spec, "--out", out,
                       "--batch-size", "4", "--no-progress"]) == 0
    ds = loop.EmbeddingDataset(out, batch_size=4)
    assert ds.num_examples == 8
    options = lambda c: {f"a {c} square", f"the colour {c}"}  # noqa: E731
    names = sorted(next(n for n in colours if c in options(n)) for c in ds.arrays["caption"])
    assert names == sorted(colours)  # one example per image, a caption of that image
    # --passes 3: every image three times, another caption drawn in each pass
    out3 = str(tmp_path / "emb3")
    assert embed_main(["--model", FIXTURE_MODEL, "--data", spec, "--out", out3, "--passes", "3",
                       "--batch-size", "4", "--no-progress"]) == 0
    ds3 = loop.EmbeddingDataset(out3, batch_size=4)
    caps = [str(c) for c in ds3.arrays["caption"]]
    assert ds3.num_examples == 24
    assert sorted(n for n in colours for c in caps if c in options(n)) == sorted(list(colours) * 3)
    assert len(set(caps)) > 8  # both captions of some images were drawn
    np.testing.assert_array_equal(ds3.arrays["image"][:8], ds3.arrays["image"][8:16])

    wd = str(tmp_path / "clip")
    data = loop.open_data(spec, "clip", _cfg(), 4, seed=0)
    res = train("clip", _cfg(), wd, data, steps=2, progress=False, console=False)
    assert res.step == 2 and np.isfinite(res.last_metrics["loss"])
    from unclip_jax.checkpoint import Checkpointer

    ck = Checkpointer(wd)
    assert ck.latest_step() == 2
    ck.close()
    with pytest.raises(ConfigError, match="tfds"):
        loop.open_data("tfds:no_such_dataset:train@" + data_dir, "clip", _cfg(), 4)


def test_bad_data_paths_say_what_is_wrong(tmp_path):
    with pytest.raises(ConfigError, match="no such folder"):
        loop.open_data(str(tmp_path / "missing"), "decoder", _cfg(), 4)
    with pytest.raises(ConfigError, match="has no embeddings.json"):
        loop.open_data(str(tmp_path), "decoder", _cfg(), 4)
    with pytest.raises(ConfigError, match="use 'synthetic"):
        loop.open_data("nonsense", "decoder", _cfg(), 4)


def test_sharded_mesh_matches_one_device(tmp_path, devices):
    """data=2 x fsdp=2 on 4 of the 8 fake devices: sharded init + sharded step give the
    one-device run's loss (to float tolerance), with params sharded over fsdp."""
    one = train("prior", _cfg(), str(tmp_path / "one"), _src(), steps=5, progress=False,
                console=False)
    res = train("prior", _cfg(**{"train.prior.mesh.data": "2", "train.prior.mesh.fsdp": "2"}),
                str(tmp_path / "mesh"), _src(), steps=5, progress=False, console=False)
    mesh = res.state.step.sharding.mesh
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 1}
    specs = [x.sharding.spec for x in jax.tree.leaves(res.state.params)]
    assert any("fsdp" in str(s) for s in specs)
    np.testing.assert_allclose(res.last_metrics["loss"], one.last_metrics["loss"], rtol=2e-4)
    # Adam normalises each update, so near-zero gradients whose sign depends on the reduction
    # order move a param by up to ~lr per step either way: compare to a few lr
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=3e-3),
                 _host(res.state.params), _host(one.state.params))


def test_resume_onto_another_mesh_through_the_trainer(tmp_path, devices):
    """A run saved on data=2 x fsdp=2 resumes on data=1 x fsdp=4 (train.STAGE.mesh may change
    between a run and its resume): the restored state lands on the new mesh with the values
    saved (bitwise), and the resumed run ends where the unbroken one does (float tolerance:
    another reduction order)."""
    m1 = {"train.prior.mesh.data": "2", "train.prior.mesh.fsdp": "2"}
    m2 = {"train.prior.mesh.data": "1", "train.prior.mesh.fsdp": "4"}
    wd = str(tmp_path / "run")
    first = train("prior", _cfg(**m1), wd, _src(), steps=3, progress=False, console=False)
    saved = _host(first.state.params)
    again = train("prior", _cfg(**m2), wd, _src(), steps=3, progress=False, console=False)
    assert int(again.state.step) == 3  # nothing left to do: restored only
    for leaf in jax.tree.leaves(again.state.params):
        assert dict(leaf.sharding.mesh.shape) == {"data": 1, "fsdp": 4, "tensor": 1}
    assert any("fsdp" in str(x.sharding.spec) for x in jax.tree.leaves(again.state.params))
    _assert_bitwise(_host(again.state.params), saved)
    resumed = train("prior", _cfg(**m2), wd, _src(), steps=6, progress=False, console=False)
    straight = train("prior", _cfg(**m1), str(tmp_path / "straight"), _src(), steps=6,
                     progress=False, console=False)
    assert int(resumed.state.step) == 6
    np.testing.assert_allclose(resumed.last_metrics["loss"], straight.last_metrics["loss"],
                               rtol=2e-4)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=3e-3),
                 _host(resumed.state.params), _host(straight.state.params))


def test_inpaint_starts_from_decoder_params(tmp_path):
    """train.inpaint.init_from (a model dir here; a decoder workdir works too): the fresh
    inpainting state is the decoder's params with zero-initialised extra input channels."""
    from unclip_jax.pipelines import model as model_lib

    cfg = _cfg(**{"train.inpaint.init_from": FIXTURE_MODEL})
    res = train("inpaint", cfg, str(tmp_path / "inp"), _src(), steps=0, progress=False,
                console=False)
    dec = _host(model_lib.load(FIXTURE_MODEL).params["decoder"])
    params, ema = _host(res.state.params), _host(res.state.ema_params)
    _assert_bitwise(params, ema)
    k = params["conv_in"]["kernel"]
    np.testing.assert_array_equal(k[:, :, :3], dec["conv_in"]["kernel"])
    assert not np.any(k[:, :, 3:])
    _assert_bitwise({n: v for n, v in params.items() if n != "conv_in"},
                    {n: v for n, v in dec.items() if n != "conv_in"})


def test_export_cli_writes_a_bf16_model_dir(tmp_path):
    """`unclip export` from per-stage sources (model dirs work as sources) with bfloat16
    storage: the dir loads as float32 weights equal to the bf16-rounded source weights."""
    import jax.numpy as jnp

    from unclip_jax.pipelines import model as model_lib
    from unclip_jax.train.cli import export_main

    out = str(tmp_path / "m")
    emb = str(tmp_path / "emb")
    assert embed_main(["--model", FIXTURE_MODEL, "--data", "synthetic", "--out", emb,
                       "--max-examples", "12", "--batch-size", "4", "--no-progress"]) == 0
    srcs = [a for s in ("clip", "prior", "decoder", "sr") for a in (f"--{s}", FIXTURE_MODEL)]
    assert export_main(["--config", MICRO, "--out", out, "--storage-dtype", "bfloat16",
                        "--pca-from", emb, *srcs]) == 0
    m, fixture = model_lib.load(out), model_lib.load(FIXTURE_MODEL)
    want = loop.EmbeddingDataset(emb, batch_size=1).arrays["image_emb"]
    np.testing.assert_allclose(m.pca.mean, want.mean(0), rtol=1e-5, atol=1e-6)
    assert model_lib.read_meta(out)["storage_dtype"] == "bfloat16" and not m.has_inpaint_decoder
    for a, b in zip(jax.tree.leaves(fixture.params["decoder"]),
                    jax.tree.leaves(m.params["decoder"])):
        np.testing.assert_array_equal(np.asarray(jnp.asarray(a, jnp.bfloat16), np.float32), b)
    with pytest.raises(ConfigError, match="no trained weights"):
        export_main(["--config", MICRO, "--out", str(tmp_path / "m2"), "--clip", FIXTURE_MODEL])
    with pytest.raises(ConfigError, match="no such folder"):
        export_main(["--config", MICRO, "--out", str(tmp_path / "m3"), "--clip",
                     str(tmp_path / "missing")])


def test_export_cli_reuses_one_upsampler_for_two_stages(tmp_path):
    """`--sr DIR:N` once per upsampler: a config with two upsamplers (8 -> 16 -> 32) exported
    from a model dir with one; both get that upsampler's weights, the model samples at 32 px,
    and a missing upsampler index or a missing folder is refused with its reason."""
    import jax.numpy as jnp

    from unclip_jax.pipelines import model as model_lib
    from unclip_jax.pipelines import stages
    from unclip_jax.train.cli import export_main

    cfg = tmp_path / "two_sr.py"
    cfg.write_text(
        "from unclip_jax.config import load_config_file\n"
        "def get_config():\n"
        f"    c = load_config_file({MICRO!r})\n"
        "    c.sr = [dict(c.sr[0]), dict(c.sr[0], image_size=32)]\n"
        "    return c\n")
    out = str(tmp_path / "m")
    srcs = [a for s in ("clip", "prior", "decoder") for a in (f"--{s}", FIXTURE_MODEL)]
    assert export_main(["--config", str(cfg), "--out", out, *srcs,
                        "--sr", FIXTURE_MODEL, "--sr", f"{FIXTURE_MODEL}:0"]) == 0
    m, fixture = model_lib.load(out), model_lib.load(FIXTURE_MODEL)
    assert [c.image_size for c in m.sr_config] == [16, 32] and m.output_size == 32
    for sr in m.params["sr"]:
        _assert_bitwise(_host(sr), _host(fixture.params["sr"][0]))
    x = jnp.zeros((1, 8, 8, 3))
    for i in range(2):
        x = stages.upsample(m, jax.random.key(i), x, i, steps=2)
    assert x.shape == (1, 32, 32, 3) and bool(jnp.all(jnp.isfinite(x)))
    with pytest.raises(ConfigError, match="no upsampler 1"):
        export_main(["--config", str(cfg), "--out", str(tmp_path / "m2"), *srcs,
                     "--sr", FIXTURE_MODEL, "--sr", FIXTURE_MODEL])
    with pytest.raises(ConfigError, match="no such folder"):
        export_main(["--config", str(cfg), "--out", str(tmp_path / "m3"), *srcs,
                     "--sr", f"{tmp_path / 'missing'}:0"])


def test_export_refuses_an_upsampler_index_on_a_train_workdir(tmp_path):
    """`DIR:N` names an upsampler of a model dir; on a train workdir (one stage, no upsampler
    list) it is refused with that reason, and `split_sr_source` only splits off a trailing
    index when the whole spec is not itself a folder."""
    from unclip_jax.config import load_config_file
    from unclip_jax.train.export import ExportError, load_stage_params, split_sr_source

    workdir = tmp_path / "sr_run"
    workdir.mkdir()
    with pytest.raises(ExportError, match="is a train workdir"):
        load_stage_params(load_config_file(MICRO), "sr", str(workdir), source_index=0)
    assert split_sr_source(f"{workdir}:1") == (str(workdir), 1)
    assert split_sr_source(str(workdir)) == (str(workdir), None)
    odd = tmp_path / "run:2"
    odd.mkdir()
    assert split_sr_source(str(odd)) == (str(odd), None)


def _read_tb_scalars(logdir: str) -> dict:
    """{(tag, step): value} from the TFRecord event files under ``logdir`` (framing: u64 length,
    u32 crc, payload, u32 crc), parsed with tensorboardX's Event protobuf."""
    import glob
    import struct

    from tensorboardX.proto.event_pb2 import Event

    out = {}
    for path in glob.glob(os.path.join(logdir, "events.out.tfevents.*")):
        with open(path, "rb") as f:
            data = f.read()
        pos = 0
        while pos < len(data):
            (n,) = struct.unpack("<Q", data[pos:pos + 8])
            ev = Event.FromString(data[pos + 12:pos + 12 + n])
            pos += 12 + n + 4
            for v in ev.summary.value:
                out[(v.tag, ev.step)] = v.simple_value
    return out


def test_metrics_go_to_jsonl_and_tensorboard(tmp_path):
    w = loop.MetricsWriter(str(tmp_path), console=False)
    w.write({"step": 25, "loss": 0.5, "lr": 1e-4, "grad_norm": 2.0, "images_per_sec": 90.0})
    w.write({"step": 50, "loss": 0.25, "lr": 2e-4, "grad_norm": float("nan")})
    w.close()
    with open(tmp_path / loop.METRICS_FILE) as f:
        recs = [json.loads(line) for line in f]
    assert recs[0]["loss"] == 0.5 and recs[1]["grad_norm"] == "nan"
    tb = _read_tb_scalars(str(tmp_path / "tensorboard"))
    assert tb[("loss", 25)] == 0.5 and tb[("loss", 50)] == 0.25
    assert tb[("images_per_sec", 25)] == 90.0 and tb[("lr", 50)] == pytest.approx(2e-4)
    assert ("grad_norm", 50) not in tb  # non-finite values stay out of TensorBoard


def test_init_from_a_model_dir_continues_from_its_weights(tmp_path):
    """train.STAGE.init_from (a model dir or workdir): params and EMA start at its weights."""
    from unclip_jax.pipelines import model as model_lib

    cfg = _cfg()
    cfg.train.prior.init_from = FIXTURE_MODEL
    res = train("prior", cfg, str(tmp_path / "p"), _src(), steps=0, progress=False,
                console=False)
    want = model_lib.load(FIXTURE_MODEL).params["prior"]["params"]
    _assert_bitwise(_host(res.state.params), want)
    _assert_bitwise(_host(res.state.ema_params), want)
    bad = _cfg(**{"prior.width": "32"})
    bad.train.prior.init_from = FIXTURE_MODEL
    with pytest.raises(Exception, match="prior"):
        train("prior", bad, str(tmp_path / "q"), _src(), steps=0, progress=False,
              console=False)


def test_init_partial_grows_a_model_without_changing_its_function(tmp_path):
    """train.decoder.init_partial: a config that adds modules (here the middle attention) starts
    from a model dir's decoder; every trained leaf is copied, the new ones keep their fresh init,
    and since the new residual branch's output layer is zero-initialised the grown UNet computes
    exactly what the trained one did. Without the flag, or when shapes differ, it refuses."""
    from unclip_jax import config as cfg_lib
    from unclip_jax.models.unet import UNet, dummy_inputs
    from unclip_jax.pipelines import model as model_lib

    trained = model_lib.load(FIXTURE_MODEL).params["decoder"]
    grow = {"decoder.use_middle_attention": "true",
            "train.decoder.init_from": FIXTURE_MODEL}
    with pytest.raises(ValueError, match="init_partial=true"):
        train("decoder", _cfg(**grow), str(tmp_path / "a"), _src(), steps=0, progress=False,
              console=False)
    cfg = _cfg(**grow, **{"train.decoder.init_partial": "true"})
    res = train("decoder", cfg, str(tmp_path / "b"), _src(), steps=0, progress=False,
                console=False)
    grown = _host(res.state.params)
    new = [k for k in grown if k not in trained]
    assert new and all("middle" in k for k in new)
    _assert_bitwise({k: grown[k] for k in trained}, trained)
    assert any(np.abs(a).sum() > 0 for a in jax.tree.leaves({k: grown[k] for k in new}))
    _assert_bitwise(_host(res.state.ema_params), grown)

    old_cfg = cfg_lib.decoder_config(_cfg())
    new_cfg = cfg_lib.decoder_config(cfg)
    kw = dummy_inputs(old_cfg, batch=2)
    rng = np.random.default_rng(0)
    kw = {k: (rng.normal(size=v.shape).astype(np.float32) if v.dtype == np.float32 else v)
          for k, v in kw.items()}
    kw["t"] = np.array([10, 700], np.int32)
    a = UNet(old_cfg).apply({"params": trained}, **kw)
    b = UNet(new_cfg).apply({"params": grown}, **kw)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    wide = _cfg(**{"decoder.model_channels": "16", "train.decoder.init_from": FIXTURE_MODEL,
                   "train.decoder.init_partial": "true"})
    with pytest.raises(ValueError, match="has shape"):
        train("decoder", wide, str(tmp_path / "c"), _src(), steps=0, progress=False,
              console=False)


def test_override_decoder_field_the_file_leaves_at_default():
    """Config files list only the UNet fields they change; --config.decoder.FIELD still sets
    any UNetConfig field (typed from its default), and a non-field is still refused."""
    from unclip_jax import config as cfg_lib

    assert "attention_impl" not in _cfg().decoder
    c = _cfg(**{"decoder.attention_impl": "xla", "decoder.remat": "true"})
    d = cfg_lib.decoder_config(c)
    assert d.attention_impl == "xla" and d.remat is True
    with pytest.raises(ConfigError, match="unknown config key"):
        _cfg(**{"decoder.attention_flavour": "xla"})
    with pytest.raises(ValueError, match="attention_impl must be one of"):
        cfg_lib.decoder_config(_cfg(**{"decoder.attention_impl": "flash"}))


def test_override_augment_keys_the_file_leaves_out():
    """train.STAGE.resized_crop_scale / resized_crop_ratio and train.sr.corruption are set from
    the command line even where the config file does not list them; the stage reads them; a
    stage without the key still refuses it."""
    from unclip_jax.train import losses

    c = _cfg()
    assert "resized_crop_scale" not in c.train.decoder and "corruption" not in c.train.sr
    c = _cfg(**{"train.decoder.resized_crop_scale": "(0.5, 1.0)",
                "train.decoder.resized_crop_ratio": "(0.8, 1.25)", "train.sr.corruption": "bsr"})
    assert tuple(c.train.decoder.resized_crop_scale) == (0.5, 1.0)
    assert tuple(c.train.decoder.resized_crop_ratio) == (0.8, 1.25)
    assert losses.sr_settings(c, 0)["corruption"] == "bsr"
    with pytest.raises(ConfigError, match="unknown config key"):
        _cfg(**{"train.prior.resized_crop_scale": "(0.5, 1.0)"})


# ------------------------------------------------------------------------------ eval


def _records(wd):
    with open(os.path.join(wd, loop.METRICS_FILE)) as f:
        return [json.loads(line) for line in f]


def test_trainer_evaluates_every_eval_every_steps(tmp_path):
    """train.prior.eval_every 2, eval_batches 2: eval records (eval_ prefix) at steps 2 and 4,
    each after that step's train record, in metrics.jsonl and TensorBoard; the eval loss is the
    loss of the EMA params on the eval batches (unjitted reference, the eval rng of each batch);
    evaluating changes nothing in training; eval_every without eval data is refused."""
    from unclip_jax.train.losses import make_loss_fn
    from unclip_jax.train.step import eval_rng

    cfg = _cfg(**{"train.prior.log_every": "2"})
    with pytest.raises(ConfigError, match="pass --eval-data"):
        train("prior", _cfg(**{"train.prior.eval_every": "2"}), str(tmp_path / "x"), _src(),
              steps=1, progress=False, console=False)
    eval_src = SyntheticSource(4, 16, seed=7, embeddings=(8, 16, 8))
    cfg_eval = _cfg(**{"train.prior.log_every": "2", "train.prior.eval_every": "2",
                       "train.prior.eval_batches": "2"})
    wd = str(tmp_path / "eval")
    res = train("prior", cfg_eval, wd, _src(), steps=4, progress=False, console=False,
                eval_data=eval_src)
    assert [s for s, _ in res.eval_history] == [2, 4]
    recs = _records(wd)
    assert [(r["step"], "eval_loss" in r) for r in recs] == [(2, False), (2, True), (4, False),
                                                             (4, True)]
    for r in recs[1::2]:
        # the loss and the loss's aux metrics, prefixed; no optimizer metrics
        assert set(r) == {"step", "eval_loss", "eval_mse", "eval_drop_text_frac"}, r
        assert np.isfinite(r["eval_loss"])
        assert r["eval_loss"] == res.eval_history[r["step"] // 2 - 1][1]["eval_loss"]
    tb = _read_tb_scalars(os.path.join(wd, "tensorboard"))
    assert tb[("eval_loss", 2)] == pytest.approx(recs[1]["eval_loss"])
    assert ("eval_loss", 4) in tb and ("loss", 4) in tb

    loss_fn = make_loss_fn("prior", cfg_eval, _host(res.frozen))
    ema, base = _host(res.state.ema_params), np.asarray(res.state.rng)
    want = np.mean([float(loss_fn(ema, eval_src.batch(i), eval_rng(base, i))[0])
                    for i in range(2)])
    np.testing.assert_allclose(res.eval_history[-1][1]["eval_loss"], want, rtol=1e-5)

    plain = train("prior", cfg, str(tmp_path / "plain"), _src(), steps=4, progress=False,
                  console=False)
    _assert_bitwise(_host(res.state), _host(plain.state))
    assert [r["step"] for r in _records(str(tmp_path / "plain"))] == [2, 4]


def test_train_cli_eval_data_flag(tmp_path):
    """`unclip train --eval-data SPEC` with train.STAGE.eval_every (a key the config file leaves
    out) writes eval metrics; --eval-data with `all` is refused with what to do instead."""
    wd = str(tmp_path / "cli")
    assert train_main(["prior", "--config", MICRO, "--workdir", wd, "--steps", "2",
                       "--data", "synthetic", "--eval-data", "synthetic", "--no-progress",
                       "--config.train.prior.eval_every=1",
                       "--config.train.prior.eval_batches=1"]) == 0
    assert [r["step"] for r in _records(wd) if "eval_loss" in r] == [1, 2]
    with pytest.raises(ConfigError, match="single STAGE"):
        train_main(["all", "--config", MICRO, "--workdir", wd, "--eval-data", "synthetic"])
    with pytest.raises(ConfigError, match="eval_every is 0"):  # eval data that would go unused
        train_main(["prior", "--config", MICRO, "--workdir", wd, "--steps", "2",
                    "--data", "synthetic", "--eval-data", "synthetic", "--no-progress"])
    with pytest.raises(ConfigError, match="local --workdir"):  # `all` ends with a local model dir
        train_main(["all", "--config", MICRO, "--workdir", "gs://bucket/run"])


# ------------------------------------------------------------------------------ accumulation


def test_grad_accumulation_schedule_runs_over_updates(tmp_path):
    """accum_steps 4, total_steps 8, no warmup: 8 loop steps apply 2 updates (one per 4
    micro-batches), the cosine schedule runs over those 2 updates (the lr applied by the last
    update is sched(1), and sched(2), where the next one would start, is the end lr); the lr
    metric changes only when an update is applied."""
    import optax

    from unclip_jax.train.optim import make_schedule

    over = {"train.prior.accum_steps": "4", "train.prior.total_steps": "8",
            "train.prior.warmup_steps": "0", "train.prior.save_every": "8"}
    cfg = _cfg(**over)
    tc = loop.train_config(cfg, "prior")
    sched = make_schedule(tc.optimizer())
    lrs = []
    res = train("prior", cfg, str(tmp_path / "acc"), _src(), progress=False, console=False,
                callbacks=[lambda step, m: lrs.append(m["lr"])])
    assert res.step == 8 and len(lrs) == 8
    opt_state = res.state.opt_state
    assert isinstance(opt_state, optax.MultiStepsState)
    assert int(opt_state.gradient_step) == 2 and int(opt_state.mini_step) == 0
    assert int(opt_state.inner_opt_state.count) == 2  # the schedule's count: updates
    assert float(sched(2)) == pytest.approx(tc.learning_rate * tc.optimizer().end_lr_ratio,
                                            abs=1e-12)
    np.testing.assert_allclose(lrs, [float(sched(0))] * 7 + [float(sched(1))], rtol=1e-6)
    assert lrs[-1] == pytest.approx(0.5 * tc.learning_rate)  # cosine half way over 2 updates
    with pytest.raises(ConfigError, match="multiple of accum_steps"):
        loop.train_config(_cfg(**dict(over, **{"train.prior.total_steps": "10"})), "prior")


# ------------------------------------------------------------------------------ all stages


@pytest.mark.parametrize("stage", ["decoder", "inpaint", "sr"])
def test_stage_trains_real_steps(stage, tmp_path):
    """2 real steps of each UNet stage through train() (no warmup: both steps have lr > 0):
    finite loss; params moved from the init (a steps=0 run), among them the zero-initialised
    output conv, which only a gradient step (not weight decay) can move; checkpoint 2 written."""
    from unclip_jax.checkpoint import Checkpointer

    wd = str(tmp_path / stage)
    cfg = _cfg(**{f"train.{stage}.warmup_steps": "0"})
    init = train(stage, cfg, wd, _src(), steps=0, progress=False, console=False)
    p0 = _host(init.state.params)
    res = train(stage, cfg, wd, _src(), steps=2, progress=False, console=False)
    assert res.step == 2 and np.isfinite(res.last_metrics["loss"])
    assert res.last_metrics["grad_norm"] > 0 and res.last_metrics["skipped"] == 0
    p2 = _host(res.state.params)
    assert not np.any(p0["out_conv"]["kernel"]) and np.any(p2["out_conv"]["kernel"])
    changed = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(p0), jax.tree.leaves(p2))]
    assert sum(changed) > len(changed) // 3, (sum(changed), len(changed))
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(p2))
    ck = Checkpointer(wd)
    assert ck.latest_step() == 2
    ck.close()


# ------------------------------------------------------------------------------ logging, mesh


def test_only_process_0_writes_metrics_and_console_logs(tmp_path, monkeypatch, capsys):
    """With jax.process_index() = 1 as the trainer's process check sees it
    (``parallel.mesh.is_main_process``; orbax keeps the real index, it would wait for a primary
    host) the trainer writes no metrics.jsonl, no TensorBoard events and nothing on the console,
    and still saves its checkpoint (every host takes part)."""
    from unclip_jax.parallel import mesh as pmesh

    class JaxOnProcess1:
        def __getattr__(self, name):
            return getattr(jax, name)

        @staticmethod
        def process_index(*args, **kwargs):
            return 1

    monkeypatch.setattr(pmesh, "jax", JaxOnProcess1())
    assert not pmesh.is_main_process()
    wd = str(tmp_path / "p1")
    cfg = _cfg(**{"train.prior.log_every": "1"})
    res = train("prior", cfg, wd, _src(), steps=2, progress=True, console=True)
    assert res.step == 2 and np.isfinite(res.last_metrics["loss"])
    assert not os.path.exists(os.path.join(wd, loop.METRICS_FILE))
    assert not os.path.exists(os.path.join(wd, "tensorboard"))
    assert "2" in os.listdir(wd)  # the checkpoint
    err = capsys.readouterr().err
    assert "loss=" not in err and "train prior" not in err, err
    monkeypatch.undo()  # process 0 does write
    train("prior", cfg, str(tmp_path / "p0"), _src(), steps=1, progress=False, console=True)
    assert "loss=" in capsys.readouterr().err
    assert [r["step"] for r in _records(str(tmp_path / "p0"))] == [1]


def test_stage_mesh_on_fewer_devices_warns(devices, caplog):
    with caplog.at_level("WARNING", logger="unclip_jax.train.loop"):
        mesh = loop.stage_mesh(dict(data=2, fsdp=1, tensor=1), devices, "decoder")
    assert mesh.devices.size == 2
    msgs = [r.getMessage() for r in caplog.records]
    assert len(msgs) == 1 and "uses only 2 of the 8 devices" in msgs[0]
    assert "--config.train.decoder.mesh.data=-1" in msgs[0]
    caplog.clear()
    with caplog.at_level("WARNING", logger="unclip_jax.train.loop"):
        assert loop.stage_mesh(dict(data=-1, fsdp=2, tensor=1), devices).devices.size == 8
        assert loop.stage_mesh(dict(data=4, fsdp=2, tensor=1), devices).devices.size == 8
    assert not caplog.records


class FakeRemotePath:
    """An ``epath.Path``-like object for a ``gs://`` URL whose files live in ``store`` (a dict):
    what MetricsWriter must go through for a remote workdir (no local folder, no network)."""

    def __init__(self, url, store):
        self.url, self.store = url, store

    def __str__(self):
        return self.url

    def __truediv__(self, name):
        return FakeRemotePath(f"{self.url}/{name}", self.store)

    def mkdir(self, parents=False, exist_ok=False):
        self.store.setdefault(self.url + "/", "")

    def exists(self):
        return self.url in self.store

    def read_text(self):
        return self.store[self.url]

    def write_text(self, text):
        self.store[self.url] = text

    def open(self, mode="r"):
        raise AssertionError("a remote object cannot be opened for appending")


def test_metrics_writer_remote_workdir(tmp_path, monkeypatch):
    """A gs:// workdir is a URL path (etils.epath), not a local 'gs:' folder; records go
    through the path object, after what an earlier run left there (a resume), uploaded on
    flush / close (and every remote_flush_seconds), not once per record."""
    monkeypatch.chdir(tmp_path)
    p = loop.as_path("gs://bucket/run")
    assert loop.is_remote(p) and str(p / loop.METRICS_FILE) == "gs://bucket/run/metrics.jsonl"
    assert not loop.is_remote(loop.as_path(str(tmp_path)))
    store = {"gs://bucket/run/metrics.jsonl": '{"step": 1}\n'}
    w = loop.MetricsWriter(FakeRemotePath("gs://bucket/run", store), console=False,
                           tensorboard=False, remote_flush_seconds=3600)
    w.write({"step": 2, "loss": 0.5})
    assert store["gs://bucket/run/metrics.jsonl"] == '{"step": 1}\n'  # no upload per record
    w.flush()
    assert store["gs://bucket/run/metrics.jsonl"].endswith('"step": 2}\n')
    w.write({"step": 3, "loss": float("nan")})
    w.close()
    lines = [json.loads(x) for x in store["gs://bucket/run/metrics.jsonl"].splitlines()]
    assert lines == [{"step": 1}, {"step": 2, "loss": 0.5}, {"step": 3, "loss": "nan"}]
    assert os.listdir(tmp_path) == []  # nothing written locally (no ./gs:/bucket/...)


def test_ema_warmup_default_and_shipped_configs():
    """A train section without ema_warmup keeps the trainer's long-standing default (warmup on:
    a run saved before resumes unchanged); the shipped configs set it in every train section."""
    import glob

    from unclip_jax.config import load_config_file
    from unclip_jax.train.ema import EmaConfig

    c = _cfg()
    del c.train.prior["ema_warmup"]
    assert loop.train_config(c, "prior").ema() == EmaConfig(decay=0.9, warmup=True)
    checked = 0
    for path in glob.glob(os.path.join(HERE, "..", "experiments", "*.py")):
        try:
            c = load_config_file(path)
        except ConfigError:  # a helper module without get_config()
            continue
        for stage in c.train:
            assert "ema_warmup" in c.train[stage], (path, stage)
            checked += 1
    assert checked >= 20


# ------------------------------------------------------------------------------ CLI errors


def _write_checkpoint(wd, cfg_json=None):
    import jax.numpy as jnp

    from unclip_jax.checkpoint import Checkpointer
    from unclip_jax.train import TrainState, make_optimizer

    opt = make_optimizer(dict(name="sgd", learning_rate=0.1, schedule="constant"))
    state = TrainState.create({"w": jnp.ones((2, 3))}, opt, jax.random.PRNGKey(0))
    with Checkpointer(wd, async_save=False, config=cfg_json) as ck:
        ck.save(3, {"train": state})


def _one_line_error(capsys, argv, code=2):
    from unclip_jax import cli

    rc = cli.main(argv)
    err = capsys.readouterr().err
    lines = [x for x in err.strip().splitlines() if "WARNING" not in x]
    assert rc == code, err
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_unclip_train_checkpoint_errors_are_one_line_exit_2(tmp_path, monkeypatch, capsys):
    """`unclip train` on a workdir whose checkpoint has another format version, or cannot be
    restored (another model's state), prints one line saying what to do, exit code 2."""
    from unclip_jax.checkpoint import manager as ckpt_manager

    args = ["train", "prior", "--config", MICRO, "--steps", "4", "--no-progress"]
    newer = str(tmp_path / "newer")
    monkeypatch.setattr(ckpt_manager, "FORMAT_VERSION", ckpt_manager.FORMAT_VERSION + 1)
    _write_checkpoint(newer, loop.stage_config_json(_cfg(), "prior"))
    monkeypatch.undo()
    line = _one_line_error(capsys, args + ["--workdir", newer])
    assert "has format version" in line and "new --workdir" in line

    other = str(tmp_path / "other")
    _write_checkpoint(other, loop.stage_config_json(_cfg(), "prior"))
    line = _one_line_error(capsys, args + ["--workdir", other])
    assert "failed to restore checkpoint" in line and "move that step folder" in line


def test_unclip_train_nonfinite_abort_exits_3(tmp_path, monkeypatch, capsys):
    """max_nonfinite (3 in the micro config) non-finite losses in a row: `unclip train` prints
    the error on one line and exits 3 (not 2: the input was fine, the run diverged)."""
    monkeypatch.setattr(loop, "open_data", lambda *a, **k: _src(nan_batches=[0, 1, 2]))
    from unclip_jax import cli

    rc = cli.main(["train", "prior", "--config", MICRO, "--workdir", str(tmp_path / "nan"),
                   "--steps", "5", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 3 and "Traceback" not in err, err
    errors = [x for x in err.splitlines() if x.startswith("error:")]
    assert len(errors) == 1 and "3 non-finite losses in a row" in errors[0], err
    assert "no checkpoint yet" in errors[0] and err.count("event=nonfinite_skipped") == 3


def test_model_dir_of_an_unsupported_format_version_says_upgrade(tmp_path, capsys):
    from unclip_jax.pipelines import model as model_lib

    newer = tmp_path / "newer"
    newer.mkdir()
    (newer / model_lib.META_FILE).write_text(json.dumps(
        {"format": model_lib.FORMAT, "format_version": model_lib.FORMAT_VERSION + 1}))
    want = (f"has model format version {model_lib.FORMAT_VERSION + 1}; this unclip_jax reads "
            f"versions {list(model_lib.SUPPORTED_VERSIONS)}. Upgrade unclip_jax (the dir is "
            "newer)")
    with pytest.raises(model_lib.ModelDirError, match=re.escape(want)):
        model_lib.read_meta(str(newer))
    line = _one_line_error(capsys, ["sample", "a cat", "--model", str(newer), "--no-progress"])
    assert want in line
    old = tmp_path / "old"
    old.mkdir()
    (old / model_lib.META_FILE).write_text(json.dumps({"format": model_lib.FORMAT,
                                                       "format_version": 0}))
    with pytest.raises(model_lib.ModelDirError, match="version 0; .*Upgrade") as info:
        model_lib.read_meta(str(old))
    assert "newer" not in str(info.value)


def test_model_dir_is_not_written_to_a_remote_url(tmp_path, monkeypatch):
    """Saving a model dir to gs://... says to export locally and copy, instead of writing a
    local './gs:/...' folder."""
    from unclip_jax.pipelines import model as model_lib

    monkeypatch.chdir(tmp_path)
    with pytest.raises(model_lib.ModelDirError, match="local disk"):
        model_lib.save(None, "gs://bucket/model")
    assert os.listdir(tmp_path) == []
