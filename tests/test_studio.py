"""`unclip studio` without a browser: the canvas mask, input checks, the progress bridge, the
command line and the app's wiring (bounded queue, 127.0.0.1, state per session)."""
from __future__ import annotations

import numpy as np
import pytest

from unclip_jax.studio import helpers as H


def test_editor_mask_is_every_painted_pixel_of_every_layer():
    layer = np.zeros((8, 10, 4), np.uint8)
    layer[2:4, 3:6, 3] = 40  # a soft brush edge still counts
    other = np.zeros((8, 10, 4), np.uint8)
    other[7, 9] = 255
    value = {"background": np.zeros((8, 10, 4), np.uint8) + 255, "layers": [layer, other]}
    m = H.editor_mask(value, (8, 10))
    assert m.sum() == 2 * 3 + 1 and m[2:4, 3:6].all() and m[7, 9]
    # a layer of another size is resized (nearest)
    big = np.zeros((16, 20, 4), np.uint8)
    big[:8, :, 3] = 255
    assert H.editor_mask({"layers": [big]}, (8, 10))[:4].all()
    assert not H.editor_mask({"layers": []}, (8, 10)).any()
    assert not H.editor_mask(None, (8, 10)).any()


def test_editor_background_and_rgb_conversion():
    assert H.editor_background(None) is None
    assert H.editor_background({"background": None, "layers": []}) is None
    assert H.editor_background({"background": np.zeros((4, 4, 4), np.uint8)}) is None  # empty
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[..., :3] = 10
    rgba[0, 0, 3] = 255
    rgb = H.to_rgb(rgba)
    assert rgb.shape == (2, 2, 3) and rgb[0, 0].tolist() == [10, 10, 10]
    assert rgb[1, 1].tolist() == [255, 255, 255]  # transparent -> white, as load_image does
    opaque = np.random.default_rng(0).integers(0, 256, (5, 5, 3), dtype=np.uint8)
    assert np.array_equal(H.to_rgb(np.dstack([opaque, np.full((5, 5), 255, np.uint8)])), opaque)


def test_small_images_are_enlarged_for_painting_by_whole_pixels():
    x = np.arange(32 * 32 * 3, dtype=np.uint8).reshape(32, 32, 3)
    y = H.for_editing(x)
    assert y.shape == (256, 256, 3) and np.array_equal(y[::8, ::8], x)
    big = np.zeros((300, 400, 3), np.uint8)
    assert H.for_editing(big) is not None and H.for_editing(big).shape == big.shape


@pytest.mark.parametrize("bad, words", [
    (lambda: H.check_prompt("  "), "prompt is empty"),
    (lambda: H.check_image(None), "No image"),
    (lambda: H.check_mask(np.zeros((4, 4), bool)), "mask is empty"),
    (lambda: H.check_mask(np.ones((4, 4), bool)), "covers the whole image"),
    (lambda: H.pick([], None), "run this tab first"),
])
def test_bad_input_says_what_to_do(bad, words):
    with pytest.raises(H.StudioInputError, match=words):
        bad()


def test_pick_takes_the_selected_result_else_the_first():
    assert H.pick(["a", "b"], 1) == "b"
    assert H.pick(["a", "b"], None) == "a"
    assert H.pick(["a", "b"], 7) == "a"


def test_progress_bridge_forwards_stages_and_restores_the_module():
    from unclip_jax.pipelines import progress as progress_lib

    seen = []
    before_tqdm, before_cb = progress_lib.tqdm, progress_lib.callback
    bridge = H.ProgressBridge(lambda step, total, name: seen.append((step, total, name)),
                              steps=False)
    with bridge.active():
        assert progress_lib.callback(True) is None  # no host callback in the loops
        with progress_lib.stage("decoder"):
            progress_lib.report(3, 4)
    assert progress_lib.tqdm is before_tqdm and progress_lib.callback is before_cb
    # the reported step, then the stage's completion when it ends
    assert seen[0] == (0, 1, "decoder") and (3, 4, "decoder") in seen
    assert seen[-1] == (4, 4, "decoder")
    with H.ProgressBridge(lambda *a: 1 / 0).active():  # a failing sink never breaks a job
        with progress_lib.stage("prior"):
            progress_lib.report(1, 2)


def test_write_pngs(tmp_path):
    from PIL import Image

    ims = [np.full((4, 4, 3), i * 50, np.uint8) for i in range(3)]
    paths = H.write_pngs(ims, str(tmp_path), "x", grid=np.zeros((6, 6, 3), np.uint8))
    assert [p.rsplit("/", 1)[1] for p in paths] == ["x_grid.png", "x_1.png", "x_2.png",
                                                    "x_3.png"]
    assert np.array_equal(np.asarray(Image.open(paths[2])), ims[1])


def test_command_line_defaults_and_bad_arguments(capsys):
    from unclip_jax.studio import app

    args = app.build_parser().parse_args([])
    assert args.host == "127.0.0.1" and args.port == 7860 and args.queue_size >= 1
    assert not args.step_progress
    assert app.studio_main(["--num", "0"]) == 2
    assert "--num must be >= 1" in capsys.readouterr().err
    assert app.studio_main(["--model", "/nonexistent/model"]) == 2
    assert "unclip studio: error" in capsys.readouterr().err


def test_app_wiring_queue_tabs_and_per_session_state(tmp_path):
    import gradio as gr

    from unclip_jax.cli import load_model
    from unclip_jax.studio import app

    model = load_model("random:tiny")
    demo = app.build_app(model, app.StudioDefaults(num=2, prior_steps=2, decoder_steps=2,
                                                   sr_steps=2), out_dir=str(tmp_path))
    blocks = list(demo.blocks.values())
    tabs = [b.label for b in blocks if isinstance(b, gr.Tab)]
    assert tabs == ["Generate", "Edit", "Variations", "Interpolate", "Text diff",
                    "PCA explorer"]
    assert any(isinstance(b, gr.ImageEditor) for b in blocks)
    # results live in gr.State (copied per session), never on the Studio object
    assert sum(isinstance(b, gr.State) for b in blocks) >= 7
    # every result gallery writes PNG
    assert all(b.format == "png" for b in blocks if isinstance(b, gr.Gallery))
    demo.queue(max_size=3, default_concurrency_limit=1)
    assert demo._queue.max_size == 3


def test_handlers_turn_bad_input_into_page_errors(tmp_path):
    import gradio as gr

    from unclip_jax.studio import app

    st = app.Studio(model=None, defaults=app.StudioDefaults(), out_dir=str(tmp_path))
    with pytest.raises(gr.Error, match="prompt is empty"):
        app.handler(st.generate)("", 2, 0, 1.0, 1.0, 2, 2, 2, progress=lambda *a, **k: None)
    empty = {"background": np.full((8, 8, 4), 255, np.uint8), "layers": []}
    with pytest.raises(gr.Error, match="mask is empty"):
        app.handler(st.inpaint)(empty, [], "a star", 2, 0, 0.0, 2, 2, 2,
                                progress=lambda *a, **k: None)
    full = dict(empty, layers=[np.full((8, 8, 4), 255, np.uint8)])
    with pytest.raises(gr.Error, match="covers the whole image"):
        app.handler(st.inpaint)(full, [], "a star", 2, 0, 0.0, 2, 2, 2,
                                progress=lambda *a, **k: None)
    with pytest.raises(gr.Error, match="No image"):
        app.handler(st.inpaint)(None, [], "a star", 2, 0, 0.0, 2, 2, 2,
                                progress=lambda *a, **k: None)
    with pytest.raises(gr.Error, match="No image"):
        app.handler(st.variations)(None, 2, 0, False, 0.3, 1.0, 2, 2,
                                   progress=lambda *a, **k: None)
    with pytest.raises(gr.Error, match="image B"):
        app.handler(st.interpolate)(np.zeros((4, 4, 3), np.uint8), None, 3, 0, False, 1.0, 2,
                                    2, 200, progress=lambda *a, **k: None)
    with pytest.raises(gr.Error, match="Nothing to undo"):
        app.handler(st.undo_edit)([np.zeros((4, 4, 3), np.uint8)])


def test_studio_main_without_gradio_says_how_to_install(monkeypatch, capsys):
    import builtins

    import unclip_jax.studio as studio

    real_import = builtins.__import__

    def no_gradio(name, *a, **k):
        if name == "unclip_jax.studio.app" or name.startswith("gradio"):
            raise ImportError("No module named 'gradio'")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_gradio)
    assert studio.studio_main([]) == 2
    assert "pip install -e '.[studio]'" in capsys.readouterr().err
