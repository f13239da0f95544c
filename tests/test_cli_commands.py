"""The `unclip` subcommands end to end on the tiny random model, in process
(`unclip_jax.cli.main([...])`; the model is built once per session through the CLI's model
cache), plus two runs of the real console script. 2 sampling steps everywhere."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from unclip_jax import cli
from unclip_jax.utils.images import make_grid

S = 32  # tiny model output size
D = 16  # tiny decoder size
FAST = ["--model", "random:tiny", "--no-progress", "--decoder-steps", "2", "--sr-steps", "2"]
PRIOR = ["--prior-steps", "2"]


@pytest.fixture(scope="module", autouse=True)
def model():
    return cli.load_model("random:tiny")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("inputs")
    rng = np.random.default_rng(0)
    paths = {}
    for name in ("a", "b"):
        paths[name] = str(d / f"{name}.png")
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(paths[name])
    mask = np.zeros((40, 40), np.uint8)
    mask[10:25, 5:30] = 255
    paths["mask"] = str(d / "mask.png")
    Image.fromarray(mask).save(paths["mask"])
    Image.fromarray(mask[::2, ::2]).save(str(d / "mask_small.png"))
    paths["mask_small"] = str(d / "mask_small.png")
    grey = mask.copy()
    grey[0, :5] = 128
    Image.fromarray(grey).save(str(d / "grey.png"))
    paths["grey"] = str(d / "grey.png")
    Image.fromarray(np.zeros((40, 40), np.uint8)).save(str(d / "black.png"))
    Image.fromarray(np.full((40, 40), 255, np.uint8)).save(str(d / "white.png"))
    paths["black"], paths["white"] = str(d / "black.png"), str(d / "white.png")
    (d / "broken.png").write_text("not a png")
    paths["broken"] = str(d / "broken.png")
    folder = d / "folder"
    folder.mkdir()
    for i in range(40):
        Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(
            str(folder / f"{i:02d}.png"))
    paths["folder"] = str(folder)
    paths["dir"] = str(d)
    return paths


def run(args, capsys):
    rc = cli.main([str(a) for a in args])
    out = capsys.readouterr()
    return rc, out.out, out.err


def png(path):
    return np.asarray(Image.open(path))


def grid_shape(n, ncols, size=S, pad=2):
    return make_grid(np.zeros((n, size, size, 3), np.uint8), ncols, pad).shape


def test_sample_prior_choices_and_stop_after(tmp_path, capsys):
    out = tmp_path / "s.png"
    rc, stdout, _ = run(["sample", "a red heart", "--num", 2, "--out", out, *FAST, *PRIOR], capsys)
    assert rc == 0 and "wrote" in stdout
    assert png(out).shape == grid_shape(2, 2)
    rc, _, _ = run(["sample", "a red heart", "--num", 2, "--prior", "ar", "--out",
                    tmp_path / "ar.png", *FAST], capsys)
    assert rc == 0 and png(tmp_path / "ar.png").shape == grid_shape(2, 2)
    rc, _, _ = run(["sample", "a red heart", "--num", 2, "--stop-after", "decoder", "--out",
                    tmp_path / "d.png", *FAST, *PRIOR], capsys)
    assert rc == 0 and png(tmp_path / "d.png").shape == grid_shape(2, 2, D)
    rc, _, _ = run(["sample", "a red heart", "--num", 2, "--stop-after", "prior", "--out",
                    tmp_path / "p.png", *FAST, *PRIOR], capsys)
    assert rc == 0 and np.load(tmp_path / "p.npy").shape == (2, 32)
    # best of 3 decoder samples: same embeddings (prior key), other decoder draws
    rc, _, _ = run(["sample", "a red heart", "--num", 2, "--decoder-candidates", 3,
                    "--stop-after", "decoder", "--out", tmp_path / "d3.png", *FAST, *PRIOR],
                   capsys)
    assert rc == 0 and png(tmp_path / "d3.png").shape == grid_shape(2, 2, D)
    assert not np.array_equal(png(tmp_path / "d3.png"), png(tmp_path / "d.png"))
    rc, _, err = run(["sample", "a red heart", "--decoder-candidates", 0, *FAST], capsys)
    assert rc != 0 and "--decoder-candidates" in err


def test_vary_same_seed_same_image_other_seed_differs(files, tmp_path, capsys):
    paths = [tmp_path / f"v{i}.png" for i in range(3)]
    for p, seed in zip(paths, (0, 0, 1)):
        rc, _, _ = run(["vary", files["a"], "--num", 2, "--seed", seed, "--out", p, *FAST],
                       capsys)
        assert rc == 0
    assert png(paths[0]).shape == grid_shape(2, 2)
    np.testing.assert_array_equal(png(paths[0]), png(paths[1]))
    assert (png(paths[0]) != png(paths[2])).any()
    rc, _, _ = run(["vary", files["a"], "--num", 2, "--invert", "--eta", "0.5", "--out",
                    tmp_path / "inv.png", *FAST], capsys)
    assert rc == 0 and png(tmp_path / "inv.png").shape == grid_shape(2, 2)


def test_interpolate_writes_strip_and_gif(files, tmp_path, capsys):
    out = tmp_path / "i.png"
    rc, stdout, _ = run(["interpolate", files["a"], files["b"], "--frames", 3, "--out", out,
                         *FAST], capsys)
    assert rc == 0
    assert png(out).shape == grid_shape(3, 3)
    with Image.open(tmp_path / "i.gif") as gif:
        # 3 frames + back again; PIL merges identical frames (random weights give near-equal
        # ones), so only the size is checked
        assert gif.size == (S, S) and gif.n_frames >= 1
    rc, _, _ = run(["interpolate", files["a"], files["b"], "--frames", 3, "--invert", "--out",
                    tmp_path / "ii.png", "--gif", tmp_path / "x.gif", *FAST], capsys)
    assert rc == 0 and os.path.isfile(tmp_path / "x.gif")


def test_textdiff_strip(files, tmp_path, capsys):
    out = tmp_path / "t.png"
    rc, _, _ = run(["textdiff", files["a"], "--from", "a photo of a cat", "--to",
                    "an anime drawing of a super saiyan cat", "--frames", 3, "--out", out, *FAST],
                   capsys)
    assert rc == 0 and png(out).shape == grid_shape(3, 3)


def test_inpaint_keeps_source_outside_mask(files, tmp_path, capsys):
    out = tmp_path / "in.png"
    rc, _, err = run(["inpaint", files["a"], "--mask", files["mask"], "--prompt", "a flamingo",
                      "--num", 1, "--feather", 2, "--keep-style", 0.3, "--out", out, *FAST,
                      *PRIOR], capsys)
    assert rc == 0, err
    res, src = png(out), png(files["a"])
    keep = png(files["mask"]) < 128
    assert res.shape == src.shape
    np.testing.assert_array_equal(res[keep], src[keep])
    # a mask of another size is resized with a warning
    rc, _, err = run(["inpaint", files["a"], "--mask", files["mask_small"], "--prompt",
                      "a flamingo", "--num", 1, "--jumps", 1, "--out", tmp_path / "in2.png",
                      *FAST, *PRIOR], capsys)
    assert rc == 0 and "WARNING" in err and "resizing the mask" in err


def test_pca_fit_then_pca_strip(files, tmp_path, capsys):
    basis = tmp_path / "basis.npz"
    rc, stdout, _ = run(["pca-fit", files["folder"], "--out", basis, "--model", "random:tiny",
                         "--no-progress", "--batch-size", 16], capsys)
    assert rc == 0 and "32 components" in stdout
    out = tmp_path / "pca.png"
    rc, stdout, _ = run(["pca", files["a"], "--basis", basis, "--dims", "1,4,32", "--out", out,
                         *FAST], capsys)
    assert rc == 0 and png(out).shape == grid_shape(3, 3)
    rc, _, err = run(["pca", files["a"], "--basis", basis, "--dims", "1,64", "--out", out,
                      *FAST], capsys)
    assert rc == 2 and "exceeds" in err
    # embeddings saved by `sample --stop-after prior` fit too
    np.save(tmp_path / "e.npy", np.random.default_rng(0).standard_normal((10, 32)))
    rc, _, err = run(["pca-fit", tmp_path / "e.npy", "--out", tmp_path / "b2.npz"], capsys)
    assert rc == 0 and "WARNING" in err  # fewer samples than dims
    # the tiny model ships no basis of its own but has an AR prior: its basis is used
    rc, _, err = run(["pca", files["a"], "--dims", "1,8", "--out", out, *FAST], capsys)
    assert rc == 0 and "AR prior's PCA basis" in err


def test_ablate_three_rows(tmp_path, capsys):
    out = tmp_path / "ab.png"
    rc, stdout, _ = run(["ablate", "a cat", "--num", 2, "--out", out, *FAST, *PRIOR], capsys)
    assert rc == 0 and png(out).shape == grid_shape(6, 2)
    assert "caption + prior image emb" in stdout


def test_probe_panel_and_probabilities(files, tmp_path, capsys):
    out = tmp_path / "pr.png"
    rc, stdout, _ = run(["probe", files["a"], "--labels", "an apple,an iPod,a pizza", "--num",
                         2, "--out", out, *FAST], capsys)
    assert rc == 0
    assert png(out).shape[1] > 3 * S and "an iPod" in stdout and "%" in stdout


LONG = " ".join(["word"] * 100)


@pytest.mark.parametrize("argv, needle", [
    (["vary", "{dir}/missing.png"], "not found"),
    (["vary", "{broken}"], "cannot read image"),
    (["interpolate", "{a}", "{dir}/nope.png"], "not found"),
    (["inpaint", "{a}", "--mask", "{grey}", "--prompt", "x"], "not binary"),
    (["inpaint", "{a}", "--mask", "{black}", "--prompt", "x"], "all black"),
    (["inpaint", "{a}", "--mask", "{white}", "--prompt", "x"], "all white"),
    (["inpaint", "{a}", "--mask", "{dir}/nomask.png", "--prompt", "x"], "mask file not found"),
    (["inpaint", "{a}", "--mask", "{mask}", "--prompt", "  "], "prompt is empty"),
    (["sample", ""], "prompt is empty"),
    (["ablate", " "], "prompt is empty"),
    (["textdiff", "{a}", "--from", "", "--to", "a dog"], "--from text is empty"),
    (["textdiff", "{a}", "--from", "a cat", "--to", "a cat"], "same CLIP text embedding"),
    (["probe", "{a}", "--labels", "apple,"], "at least two"),
    (["sample", "a cat", "--model", "{dir}"], "not an unclip_jax model dir"),
    (["vary", "{a}", "--model", "{dir}/nowhere"], "model dir not found"),
    (["sample", "a cat", "--decoder-steps", "0"], "must be >= 1"),
    (["vary", "{a}", "--sr-steps", "-3"], "must be >= 1"),
    (["sample", "a cat", "--prior-guidance", "-1"], "must be >= 0"),
    (["vary", "{a}", "--decoder-guidance", "-0.5"], "must be >= 0"),
    (["interpolate", "{a}", "{b}", "--frames", "1"], "must be >= 2"),
    (["textdiff", "{a}", "--from", "a", "--to", "b", "--frames", "1"], "must be >= 2"),
    (["pca", "{a}", "--dims", "1,x"], "comma-separated integers"),
    (["pca", "{a}", "--basis", "{dir}/nobasis.npz"], "PCA basis file not found"),
    (["pca", "{a}", "--basis", "{broken}"], "not a PCA basis file"),
    (["pca-fit", "{dir}/nothing"], "neither a folder"),
    (["inpaint", "{a}", "--mask", "{mask}", "--prompt", "x", "--keep-style", "2"], "<= 1.0"),
])
def test_bad_input_exits_2_with_one_line(argv, needle, files, capsys):
    args = [a.format(**files) for a in argv]
    if "--model" not in args:
        args += ["--model", "random:tiny"]
    if args[0] in ("sample", "ablate", "vary", "inpaint", "interpolate", "textdiff", "pca"):
        args += ["--no-progress"]
    rc, _, err = run(args, capsys)
    lines = [x for x in err.strip().splitlines() if not x.startswith("NOTE:")]
    assert rc == 2, err
    assert len(lines) == 1 and needle in lines[0], err
    assert "Traceback" not in err


def test_ar_prior_missing_is_a_usage_error(model, capsys, monkeypatch):
    monkeypatch.setattr(type(model), "has_ar_prior", property(lambda self: False))
    rc, _, err = run(["sample", "a cat", "--prior", "ar", *FAST], capsys)
    assert rc == 2 and "no autoregressive prior" in err


def test_long_prompt_warns_and_runs(tmp_path, capsys):
    rc, _, err = run(["sample", LONG, "--num", 2, "--stop-after", "prior", "--out",
                      tmp_path / "l.png", *FAST, *PRIOR], capsys)
    assert rc == 0 and "WARNING" in err and "truncated" in err


def test_model_dir_with_foreign_format(tmp_path, capsys):
    (tmp_path / "unclip.json").write_text(json.dumps({"format": "something-else"}))
    rc, _, err = run(["sample", "a cat", "--model", tmp_path], capsys)
    assert rc == 2 and "expected 'unclip_jax.model'" in err


def _console(*args, timeout=300):
    exe = os.path.join(os.path.dirname(sys.executable), "unclip")
    cmd = [exe] if os.path.exists(exe) else [sys.executable, "-m", "unclip_jax.cli"]
    return subprocess.run(cmd + [str(a) for a in args], capture_output=True, text=True,
                          timeout=timeout)


def test_console_script_bad_input_is_one_line(files):
    p = _console("vary", os.path.join(files["dir"], "missing.png"))
    assert p.returncode == 2
    assert len(p.stderr.strip().splitlines()) == 1 and "Traceback" not in p.stderr
    p = _console("interpolate", files["a"], files["b"], "--frames", "1")
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1


def test_console_script_vary_end_to_end(files, tmp_path):
    out = tmp_path / "cs.png"
    p = _console("vary", files["a"], "--num", "2", "--out", out, *FAST)
    assert p.returncode == 0, p.stderr
    assert png(out).shape == grid_shape(2, 2)
