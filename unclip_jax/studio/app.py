"""`unclip studio`: a local Gradio web app over the unCLIP pipelines.

Tabs: Generate, Edit (brush a region, type what goes there, pick a candidate, keep editing),
Variations, Interpolate, Text diff, PCA explorer. Every result can be downloaded as PNG and sent
to another tab as its input.

Per-session: all results live in ``gr.State`` (one copy per browser session); the only
process-wide objects are the model (read-only parameters and compiled samplers) and the
folder that download files are written to. Events run one at a time (the model and the CPU are
shared) from a bounded queue. Bad input raises ``gr.Error`` with a message shown in the page.
"""
from __future__ import annotations

import argparse
import atexit
import functools
import os
import shutil
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home
import gradio as gr  # noqa: E402

from unclip_jax.studio import helpers as H  # noqa: E402

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860
DEFAULT_QUEUE_SIZE = 16

TAB_GENERATE, TAB_EDIT, TAB_VARY, TAB_INTERP, TAB_TEXTDIFF, TAB_PCA = (
    "generate", "edit", "vary", "interp", "textdiff", "pca")


@dataclass
class StudioDefaults:
    """Initial control values (``None``: the model's configured value)."""

    num: int = 4
    prior_steps: Optional[int] = None
    decoder_steps: Optional[int] = None
    sr_steps: Optional[int] = None
    seed: int = 0
    step_progress: bool = False  # per-step bars (host callbacks: no persistent compile cache)


# ------------------------------------------------------------------------------ plumbing


def _steps_default(model, stage: str, given: Optional[int]) -> int:
    if given:
        return int(given)
    s = str(model.stage_options(stage).sample_steps)
    return int(s) if s.isdigit() else 25


def _guidance_default(model, stage: str) -> float:
    return float(model.stage_options(stage).get("guidance", 1.0))


def _uint8(x) -> np.ndarray:
    from unclip_jax.utils.images import to_uint8

    x = np.asarray(x)
    return x if x.dtype == np.uint8 else to_uint8(x)


def _key(seed):
    import jax

    try:
        s = int(seed or 0)
    except (TypeError, ValueError):
        s = 0
    return jax.random.key(s % (2 ** 31))


def _int(v, lo: int = 1) -> int:
    try:
        return max(lo, int(v))
    except (TypeError, ValueError):
        return lo


def handler(fn):
    """Run an event handler: user errors become ``gr.Error`` (a message in the page), anything
    else is logged with its traceback on the server and shown as a one-line error; the server
    goes on serving. Pipeline warnings (truncated prompts) become ``gr.Warning``."""
    @functools.wraps(fn)
    def run(*args, **kwargs):
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                out = fn(*args, **kwargs)
            for w in caught:
                if "truncated" in str(w.message):
                    gr.Warning(str(w.message))
            return out
        except gr.Error:
            raise
        except (H.StudioInputError, ValueError) as e:
            raise gr.Error(str(e), print_exception=False) from None
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            raise gr.Error(f"Something went wrong ({type(e).__name__}: {e}); the server log "
                           "has the details.", print_exception=False) from None
    return run


def _same_picture(a, b, tol: int = 2) -> bool:
    """Whether the canvas still shows ``a`` (the browser hands back ``b``)."""
    a, b = np.asarray(a), np.asarray(b)
    return a.shape == b.shape and int(np.abs(a.astype(np.int16) - b).max()) <= tol


STAGE_NAMES = {"clip": "CLIP encoding", "prior": "prior", "ar prior": "AR prior",
               "decoder": "decoder", "sr1": "upsampler 1", "sr2": "upsampler 2",
               "invert": "DDIM inversion", "embed": "CLIP embedding"}


def _tracker(progress, steps: bool):
    """A ProgressBridge that moves the page's progress bar: the stage running now and, with
    ``steps``, its step / total."""
    def sink(step, total, name):
        desc = STAGE_NAMES.get(name, name or "working")
        if steps:
            progress((step, total), desc=desc, unit="steps")
        else:
            progress(None if total <= 0 else min(step / total, 1.0), desc=desc)
    return H.ProgressBridge(sink, steps=steps)


# ------------------------------------------------------------------------------ the app


class Studio:
    """Handlers over one model; every method that makes results returns them for the
    session's ``gr.State`` (nothing is kept on ``self``)."""

    def __init__(self, model, defaults: StudioDefaults, out_dir: str):
        self.model = model
        self.defaults = defaults
        self.out_dir = out_dir

    # -- helpers
    def _files(self, images, stem, grid=True):
        from unclip_jax.utils.images import make_grid

        g = make_grid(np.asarray(images)) if grid and len(images) > 1 else None
        return H.write_pngs(list(images), self.out_dir, stem, grid=g)

    def _warn_long(self, texts):
        from unclip_jax.pipelines.stages import tokenize

        toks = tokenize(self.model, list(texts))
        for text, n, cut in zip(texts, toks.lengths, toks.truncated):
            if cut:
                short = text if len(text) <= 40 else text[:37] + "..."
                gr.Warning(f"\"{short}\" has {int(n)} tokens, more than the model's "
                           f"{toks.ids.shape[1]}; it was truncated.")

    @staticmethod
    def _gallery(images, captions=None):
        return [(im, None if captions is None else captions[i]) for i, im in enumerate(images)]

    # -- Generate
    def generate(self, prompt, num, seed, prior_guidance, decoder_guidance, prior_steps,
                 decoder_steps, sr_steps, progress=gr.Progress()):
        from unclip_jax.pipelines.text_to_image import text_to_image

        prompt = H.check_prompt(prompt)
        self._warn_long([prompt])
        with _tracker(progress, self.defaults.step_progress).active():
            out = text_to_image(
                self.model, [prompt], _key(seed), num_per_prompt=_int(num),
                prior_steps=_int(prior_steps), decoder_steps=_int(decoder_steps),
                sr_steps=_int(sr_steps), prior_guidance=float(prior_guidance),
                decoder_guidance=float(decoder_guidance), progress=True)
        images = list(_uint8(out["images"]))
        return images, self._gallery(images), self._files(images, "generate"), 0

    # -- Edit
    def inpaint(self, editor, history, prompt, num, seed, keep_style, prior_steps,
                decoder_steps, sr_steps, progress=gr.Progress()):
        from unclip_jax.pipelines.inpaint import inpaint

        image = H.editor_background(editor)
        if image is None:
            raise H.StudioInputError("No image: upload one onto the canvas (or send a result "
                                     "here from another tab) first.")
        mask = H.check_mask(H.editor_mask(editor, image.shape))
        prompt = H.check_prompt(prompt, "description of what goes in the painted region")
        if history and _same_picture(history[-1], image):
            image = history[-1]  # the exact pixels this session put on the canvas
        self._warn_long([prompt])
        with _tracker(progress, self.defaults.step_progress).active():
            out = inpaint(self.model, image, mask, prompt, _key(seed), num=_int(num),
                          keep_style=float(keep_style), prior_steps=_int(prior_steps),
                          decoder_steps=_int(decoder_steps), sr_steps=_int(sr_steps),
                          progress=True)
        cands = list(out["images"])
        history = list(history or [])
        if not history or history[-1] is not image:
            history = [image]  # a new picture: its edit stack starts here
        return (cands, self._gallery(cands), H.mask_preview(mask),
                self._files(cands, "edit"), 0, history,
                self._gallery(history, self._history_captions(history)))

    @staticmethod
    def _history_captions(history):
        return ["original"] + [f"edit {i}" for i in range(1, len(history))]

    def keep_editing(self, cands, sel, history):
        chosen = H.pick(cands, sel, "candidate")
        history = list(history or []) + [chosen]
        return (self._editor_value(chosen), history,
                self._gallery(history, self._history_captions(history)))

    def undo_edit(self, history):
        history = list(history or [])
        if len(history) < 2:
            raise H.StudioInputError("Nothing to undo: no edit has been kept yet.")
        history = history[:-1]
        return (self._editor_value(history[-1]), history,
                self._gallery(history, self._history_captions(history)))

    @staticmethod
    def _editor_value(image):
        return {"background": image, "layers": [], "composite": image}

    # -- Variations
    def variations(self, image, num, seed, invert, eta, decoder_guidance, decoder_steps,
                   sr_steps, progress=gr.Progress()):
        from unclip_jax.pipelines.variations import variations

        image = H.check_image(image)
        with _tracker(progress, self.defaults.step_progress).active():
            out = variations(self.model, image, _key(seed), num=_int(num), invert=bool(invert),
                             eta=float(eta) if invert else None,
                             decoder_guidance=float(decoder_guidance),
                             decoder_steps=_int(decoder_steps), sr_steps=_int(sr_steps),
                             progress=True)
        images = list(_uint8(out["images"]))
        return images, self._gallery(images), self._files(images, "variations"), 0

    # -- Interpolate
    def interpolate(self, a, b, frames, seed, invert, decoder_guidance, decoder_steps,
                    sr_steps, frame_ms, progress=gr.Progress()):
        from unclip_jax.pipelines.interpolate import interpolate
        from unclip_jax.utils.images import make_grid, save_gif

        a = H.check_image(a, "image A")
        b = H.check_image(b, "image B")
        with _tracker(progress, self.defaults.step_progress).active():
            out = interpolate(self.model, a, b, _key(seed), frames=_int(frames, 2),
                              invert=bool(invert), decoder_guidance=float(decoder_guidance),
                              decoder_steps=_int(decoder_steps), sr_steps=_int(sr_steps),
                              progress=True)
        images = list(_uint8(out["images"]))
        t = [f"t = {float(x):.2f}" for x in np.asarray(out["t"])]
        files = H.write_pngs(images, self.out_dir, "frame",
                             grid=make_grid(np.asarray(images), ncols=len(images)))
        gif = save_gif(images + images[-2:0:-1], os.path.join(os.path.dirname(files[0]),
                                                              "interpolation.gif"),
                       duration_ms=_int(frame_ms, 20))
        return images, self._gallery(images, t), gif, files + [gif], 0

    # -- Text diff
    def text_diff(self, image, src, dst, frames, max_theta, seed, invert, decoder_guidance,
                  decoder_steps, sr_steps, progress=gr.Progress()):
        from unclip_jax.pipelines.text_diff import text_diff
        from unclip_jax.utils.images import make_grid

        image = H.check_image(image)
        src = H.check_prompt(src, "caption of the image now (from)")
        dst = H.check_prompt(dst, "caption of the edited image (to)")
        self._warn_long([src, dst])
        with _tracker(progress, self.defaults.step_progress).active():
            out = text_diff(self.model, image, src, dst, _key(seed), frames=_int(frames, 2),
                            max_theta=float(max_theta), invert=bool(invert),
                            decoder_guidance=float(decoder_guidance),
                            decoder_steps=_int(decoder_steps), sr_steps=_int(sr_steps),
                            progress=True)
        images = list(_uint8(out["images"]))
        caps = [f"θ = {float(x):.2f}" for x in np.asarray(out["theta"])]
        files = H.write_pngs(images, self.out_dir, "textdiff",
                             grid=make_grid(np.asarray(images), ncols=len(images)))
        return images, self._gallery(images, caps), files, 0

    # -- PCA explorer
    def basis(self, upload):
        from unclip_jax.pipelines.model import load_pca

        if upload is not None:
            path = upload if isinstance(upload, str) else getattr(upload, "name", None)
            b = load_pca(path)
            src = os.path.basename(path)
        elif self.model.pca is not None:
            b, src = self.model.pca, "the model's pca.npz"
        elif self.model.has_ar_prior:
            b, src = self.model.ar_components()[0], "the AR prior's basis"
        else:
            raise H.StudioInputError("This model ships no PCA basis: upload one made with "
                                     "`unclip pca-fit IMAGE_FOLDER --out basis.npz`.")
        d = self.model.clip_config.projection_dim
        if b.mean.shape[0] != d:
            raise H.StudioInputError(f"The basis is for {b.mean.shape[0]}-d embeddings but "
                                     f"this model's CLIP makes {d}-d ones.")
        return b, src

    def basis_info(self, upload):
        try:
            b, src = self.basis(upload)
        except (H.StudioInputError, ValueError) as e:
            return gr.Slider(), f"⚠ {e}"
        k = int(b.num_components)
        ratio = np.asarray(getattr(b, "explained_variance", np.zeros(k)), np.float64)
        total = float(np.asarray(getattr(b, "total_variance", ratio.sum() or 1.0)))
        share = 100.0 * ratio.sum() / total if total > 0 else 0.0
        return (gr.Slider(minimum=1, maximum=k, value=min(k, max(1, k // 2)), step=1),
                f"Basis: {src}, {k} components ({share:.1f}% of the variance).")

    def pca_one(self, image, upload, k, seed, decoder_guidance, decoder_steps, sr_steps,
                progress=gr.Progress()):
        return self.pca(image, upload, k, seed, False, decoder_guidance, decoder_steps,
                        sr_steps, progress)

    def pca_all(self, image, upload, k, seed, decoder_guidance, decoder_steps, sr_steps,
                progress=gr.Progress()):
        return self.pca(image, upload, k, seed, True, decoder_guidance, decoder_steps,
                        sr_steps, progress)

    def pca(self, image, upload, k, seed, strip, decoder_guidance, decoder_steps, sr_steps,
            progress):
        from unclip_jax.pipelines.pca import default_dims, pca_strip

        image = H.check_image(image)
        b, _ = self.basis(upload)
        k = min(_int(k), int(b.num_components))
        dims = default_dims(int(b.num_components)) if strip else [k]
        with _tracker(progress, self.defaults.step_progress).active():
            out = pca_strip(self.model, image, b, dims, _key(seed),
                            decoder_guidance=float(decoder_guidance),
                            decoder_steps=_int(decoder_steps), sr_steps=_int(sr_steps),
                            progress=True)
        images = list(_uint8(out["images"]))
        caps = [f"top {d} of {b.num_components}" for d in dims]
        return images, self._gallery(images, caps), self._files(images, "pca"), 0


# ------------------------------------------------------------------------------ layout


def build_app(model, defaults: Optional[StudioDefaults] = None, out_dir: Optional[str] = None):
    """The studio as a ``gr.Blocks`` (not launched) over ``model`` (an ``UnCLIP``)."""
    defaults = defaults or StudioDefaults()
    if out_dir is None:
        out_dir = tempfile.mkdtemp(prefix="unclip_studio_")
        atexit.register(shutil.rmtree, out_dir, True)
    st = Studio(model, defaults, out_dir)
    ps = _steps_default(model, "prior", defaults.prior_steps)
    ds = _steps_default(model, "decoder", defaults.decoder_steps)
    ss = _steps_default(model, "sr", defaults.sr_steps)
    pg, dg = _guidance_default(model, "prior"), _guidance_default(model, "decoder")
    max_steps = max(100, ps, ds, ss)
    note = ""
    if getattr(model, "random_weights", False):
        note = ("\n\n> **Untrained model** (random weights): the pictures are noise-like. "
                "Start the studio with `--model DIR` for a trained model.")
    # System fonts only: the page must not fetch anything from outside this machine.
    theme = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                              font_mono=["ui-monospace", "monospace"])
    css = ".unclip-note {font-size: 0.9em; opacity: 0.8}"

    def seed_box(**kw):
        return gr.Number(value=defaults.seed, precision=0, label="Seed", **kw)

    def steps_sliders(prior=True):
        out = []
        if prior:
            out.append(gr.Slider(1, max_steps, value=ps, step=1, label="Prior steps"))
        out.append(gr.Slider(1, max_steps, value=ds, step=1, label="Decoder steps"))
        out.append(gr.Slider(1, max_steps, value=ss, step=1, label="Upsampler steps"))
        return out

    def gallery(elem_id, label, columns=4, height=360):
        return gr.Gallery(label=label, elem_id=elem_id, format="png", columns=columns,
                          height=height, object_fit="contain", show_download_button=True,
                          interactive=False)

    def select_index(evt: gr.SelectData):
        return evt.index

    with warnings.catch_warnings():
        # Gradio 5 (pinned < 6) takes theme and css here; 6 moves them to launch()
        warnings.filterwarnings("ignore", message=".*parameter in the Blocks constructor",
                                category=DeprecationWarning)
        demo = gr.Blocks(title="unclip studio", theme=theme, css=css, analytics_enabled=False,
                         delete_cache=(3600, 3600))
    with demo:
        gr.Markdown("# unclip studio\nunCLIP (DALL-E 2) in JAX: generate, edit and explore. "
                    f"Model: `{getattr(model, 'source', None) or 'random'}`." + note)
        # per-session results (gr.State values are copied for each browser session)
        s = {name: gr.State([]) for name in (TAB_GENERATE, "edit_cands", TAB_VARY, TAB_INTERP,
                                             TAB_TEXTDIFF, TAB_PCA)}
        sel = {name: gr.State(0) for name in s}
        history = gr.State([])

        with gr.Tabs(elem_id="tabs") as tabs:
            # ---------------------------------------------------------------- Generate
            with gr.Tab("Generate", id=TAB_GENERATE, elem_id="tab-generate"):
                with gr.Row():
                    with gr.Column(scale=2):
                        g_prompt = gr.Textbox(label="Prompt", placeholder="a red heart",
                                              elem_id="gen-prompt", lines=1)
                        g_run = gr.Button("Generate", variant="primary", elem_id="gen-run")
                        with gr.Row():
                            g_num = gr.Slider(1, 16, value=defaults.num, step=1, label="Images")
                            g_seed = seed_box(elem_id="gen-seed")
                        with gr.Accordion("Guidance and steps", open=False):
                            g_pg = gr.Slider(0, 20, value=pg, step=0.5, label="Prior guidance")
                            g_dg = gr.Slider(0, 20, value=dg, step=0.5,
                                             label="Decoder guidance")
                            g_steps = steps_sliders()
                    with gr.Column(scale=3):
                        g_gal = gallery("gen-gallery", "Results (click one to select it)")
                        g_files = gr.File(label="Download (PNG)", file_count="multiple",
                                          elem_id="gen-files", interactive=False)
                        g_send = _send_row(gr, "gen")
            # ---------------------------------------------------------------- Edit
            with gr.Tab("Edit", id=TAB_EDIT, elem_id="tab-edit"):
                with gr.Row():
                    with gr.Column(scale=3):
                        e_editor = gr.ImageEditor(
                            label="Image: upload, then paint the region to regenerate",
                            type="numpy", image_mode="RGBA", format="png",
                            sources=("upload", "clipboard"), elem_id="edit-editor",
                            layers=False, transforms=(), eraser=gr.Eraser(default_size=24),
                            brush=gr.Brush(colors=["#ff00ff"], default_color="#ff00ff",
                                           color_mode="fixed", default_size=24),
                            canvas_size=(512, 512), height=560)
                        e_prompt = gr.Textbox(label="What should be in the painted region",
                                              placeholder="a yellow star", elem_id="edit-prompt")
                        e_run = gr.Button("Inpaint", variant="primary", elem_id="edit-run")
                        with gr.Row():
                            e_num = gr.Slider(1, 8, value=defaults.num, step=1,
                                              label="Candidates")
                            e_seed = seed_box()
                        with gr.Accordion("Style and steps", open=False):
                            e_style = gr.Slider(0, 1, value=0.0, step=0.05,
                                                label="Keep the picture's style (slerp toward "
                                                      "its own embedding)")
                            e_steps = steps_sliders()
                    with gr.Column(scale=3):
                        e_gal = gallery("edit-gallery", "Candidates (click one, then keep "
                                                        "editing it)", columns=4)
                        with gr.Row():
                            e_keep = gr.Button("Keep editing the selected candidate",
                                               elem_id="edit-keep")
                            e_undo = gr.Button("Undo last kept edit", elem_id="edit-undo")
                        e_mask = gr.Image(label="Mask used (white = regenerated)",
                                          format="png", interactive=False, height=160,
                                          elem_id="edit-mask")
                        e_hist = gallery("edit-history", "Edit history (original, then each kept "
                                                          "edit)", columns=6, height=170)
                        e_files = gr.File(label="Download (PNG)", file_count="multiple",
                                          elem_id="edit-files", interactive=False)
                        e_send = _send_row(gr, "edit")
            # ---------------------------------------------------------------- Variations
            with gr.Tab("Variations", id=TAB_VARY, elem_id="tab-vary"):
                with gr.Row():
                    with gr.Column(scale=2):
                        v_img = gr.Image(label="Image", type="numpy", image_mode="RGBA",
                                         format="png", sources=("upload", "clipboard"),
                                         elem_id="vary-image", height=280)
                        v_run = gr.Button("Make variations", variant="primary",
                                          elem_id="vary-run")
                        with gr.Row():
                            v_num = gr.Slider(1, 16, value=defaults.num, step=1,
                                              label="Variations")
                            v_seed = seed_box()
                        v_inv = gr.Checkbox(label="Invert (start from the image's DDIM latent: "
                                                  "stays closer to it)", value=False,
                                            elem_id="vary-invert")
                        with gr.Accordion("Guidance and steps", open=False):
                            v_eta = gr.Slider(0, 1, value=0.3, step=0.05,
                                              label="DDIM eta with inversion (larger varies "
                                                    "more)")
                            v_dg = gr.Slider(0, 20, value=dg, step=0.5,
                                             label="Decoder guidance")
                            v_steps = steps_sliders(prior=False)
                    with gr.Column(scale=3):
                        v_gal = gallery("vary-gallery", "Variations")
                        v_files = gr.File(label="Download (PNG)", file_count="multiple",
                                          interactive=False)
                        v_send = _send_row(gr, "vary")
            # ---------------------------------------------------------------- Interpolate
            with gr.Tab("Interpolate", id=TAB_INTERP, elem_id="tab-interp"):
                with gr.Row():
                    with gr.Column(scale=2):
                        with gr.Row():
                            i_a = gr.Image(label="Image A", type="numpy", image_mode="RGBA",
                                           format="png", sources=("upload", "clipboard"),
                                           elem_id="interp-a", height=200)
                            i_b = gr.Image(label="Image B", type="numpy", image_mode="RGBA",
                                           format="png", sources=("upload", "clipboard"),
                                           elem_id="interp-b", height=200)
                        i_run = gr.Button("Interpolate", variant="primary",
                                          elem_id="interp-run")
                        with gr.Row():
                            i_frames = gr.Slider(2, 16, value=5, step=1, label="Frames")
                            i_seed = seed_box()
                        i_inv = gr.Checkbox(label="Invert (slerp the images' DDIM latents)",
                                            value=False)
                        with gr.Accordion("Guidance, steps, GIF", open=False):
                            i_ms = gr.Slider(20, 2000, value=200, step=10,
                                             label="GIF frame duration (ms)")
                            i_dg = gr.Slider(0, 20, value=dg, step=0.5,
                                             label="Decoder guidance")
                            i_steps = steps_sliders(prior=False)
                    with gr.Column(scale=3):
                        i_gal = gallery("interp-gallery", "Frames", columns=8, height=200)
                        i_gif = gr.Image(label="GIF", type="filepath", interactive=False,
                                         height=200, elem_id="interp-gif")
                        i_files = gr.File(label="Download (PNG strip, frames, GIF)",
                                          file_count="multiple", interactive=False)
                        i_send = _send_row(gr, "interp")
            # ---------------------------------------------------------------- Text diff
            with gr.Tab("Text diff", id=TAB_TEXTDIFF, elem_id="tab-textdiff"):
                with gr.Row():
                    with gr.Column(scale=2):
                        t_img = gr.Image(label="Image", type="numpy", image_mode="RGBA",
                                         format="png", sources=("upload", "clipboard"),
                                         elem_id="textdiff-image", height=260)
                        t_src = gr.Textbox(label="Caption of the image now (from)",
                                           placeholder="a red heart", elem_id="textdiff-from")
                        t_dst = gr.Textbox(label="Caption of the edited image (to)",
                                           placeholder="a blue heart", elem_id="textdiff-to")
                        t_run = gr.Button("Apply text diff", variant="primary",
                                          elem_id="textdiff-run")
                        with gr.Row():
                            t_frames = gr.Slider(2, 12, value=5, step=1, label="Frames")
                            t_theta = gr.Slider(0, 1, value=0.5, step=0.05,
                                                label="Max θ (paper: 0.5)")
                        with gr.Row():
                            t_seed = seed_box()
                            t_inv = gr.Checkbox(label="Invert", value=False)
                        with gr.Accordion("Guidance and steps", open=False):
                            t_dg = gr.Slider(0, 20, value=dg, step=0.5,
                                             label="Decoder guidance")
                            t_steps = steps_sliders(prior=False)
                    with gr.Column(scale=3):
                        t_gal = gallery("textdiff-gallery", "θ = 0 … max θ", columns=6, height=240)
                        t_files = gr.File(label="Download (PNG)", file_count="multiple",
                                          interactive=False)
                        t_send = _send_row(gr, "textdiff")
            # ---------------------------------------------------------------- PCA
            with gr.Tab("PCA explorer", id=TAB_PCA, elem_id="tab-pca"):
                with gr.Row():
                    with gr.Column(scale=2):
                        p_img = gr.Image(label="Image", type="numpy", image_mode="RGBA",
                                         format="png", sources=("upload", "clipboard"),
                                         elem_id="pca-image", height=260)
                        p_basis = gr.File(label="PCA basis .npz (optional; default: the "
                                                "model's)", file_types=[".npz"],
                                          type="filepath")
                        p_info = gr.Markdown(elem_classes=["unclip-note"])
                        p_k = gr.Slider(1, 64, value=1, step=1,
                                        label="Principal components kept",
                                        elem_id="pca-k")
                        with gr.Row():
                            p_run = gr.Button("Decode with k components", variant="primary",
                                              elem_id="pca-run")
                            p_strip = gr.Button("Strip 1, 2, 4, … all", elem_id="pca-strip")
                        p_seed = seed_box()
                        with gr.Accordion("Guidance and steps", open=False):
                            p_dg = gr.Slider(0, 20, value=dg, step=0.5,
                                             label="Decoder guidance")
                            p_steps = steps_sliders(prior=False)
                    with gr.Column(scale=3):
                        p_gal = gallery("pca-gallery", "Decoded from the top-k components")
                        p_files = gr.File(label="Download (PNG)", file_count="multiple",
                                          interactive=False)
                        p_send = _send_row(gr, "pca")

        q = dict(concurrency_limit=1)  # one job on the model at a time (also queue default)
        light = dict(concurrency_limit=None)  # UI plumbing: never waits behind a job

        # ---- Generate
        g_run.click(handler(st.generate),
                    [g_prompt, g_num, g_seed, g_pg, g_dg, *g_steps],
                    [s[TAB_GENERATE], g_gal, g_files, sel[TAB_GENERATE]], **q)
        g_prompt.submit(handler(st.generate),
                        [g_prompt, g_num, g_seed, g_pg, g_dg, *g_steps],
                        [s[TAB_GENERATE], g_gal, g_files, sel[TAB_GENERATE]], **q)
        # ---- Edit
        e_run.click(handler(st.inpaint),
                    [e_editor, history, e_prompt, e_num, e_seed, e_style, *e_steps],
                    [s["edit_cands"], e_gal, e_mask, e_files, sel["edit_cands"], history,
                     e_hist], **q)
        e_keep.click(handler(st.keep_editing), [s["edit_cands"], sel["edit_cands"], history],
                     [e_editor, history, e_hist], **light)
        e_undo.click(handler(st.undo_edit), [history], [e_editor, history, e_hist], **light)
        # ---- Variations
        v_run.click(handler(st.variations),
                    [v_img, v_num, v_seed, v_inv, v_eta, v_dg, *v_steps],
                    [s[TAB_VARY], v_gal, v_files, sel[TAB_VARY]], **q)
        # ---- Interpolate
        i_run.click(handler(st.interpolate),
                    [i_a, i_b, i_frames, i_seed, i_inv, i_dg, *i_steps, i_ms],
                    [s[TAB_INTERP], i_gal, i_gif, i_files, sel[TAB_INTERP]], **q)
        # ---- Text diff
        t_run.click(handler(st.text_diff),
                    [t_img, t_src, t_dst, t_frames, t_theta, t_seed, t_inv, t_dg, *t_steps],
                    [s[TAB_TEXTDIFF], t_gal, t_files, sel[TAB_TEXTDIFF]], **q)
        # ---- PCA
        pca_inputs = [p_img, p_basis, p_k, p_seed]
        pca_outputs = [s[TAB_PCA], p_gal, p_files, sel[TAB_PCA]]
        p_run.click(handler(st.pca_one), pca_inputs + [p_dg, *p_steps], pca_outputs, **q)
        p_k.release(handler(st.pca_one), pca_inputs + [p_dg, *p_steps], pca_outputs, **q)
        p_strip.click(handler(st.pca_all), pca_inputs + [p_dg, *p_steps], pca_outputs, **q)
        p_basis.change(st.basis_info, [p_basis], [p_k, p_info], **light)
        demo.load(st.basis_info, [p_basis], [p_k, p_info], **light)

        # ---- selection in every result gallery
        for name, gal in ((TAB_GENERATE, g_gal), ("edit_cands", e_gal), (TAB_VARY, v_gal),
                          (TAB_INTERP, i_gal), (TAB_TEXTDIFF, t_gal), (TAB_PCA, p_gal)):
            gal.select(select_index, None, sel[name], **light)

        # ---- "send to": every result can be the input of another tab
        targets = {
            TAB_EDIT: ([e_editor, history, e_hist, e_gal, s["edit_cands"]], lambda im: (
                Studio._editor_value(H.for_editing(im)), [H.for_editing(im)],
                Studio._gallery([H.for_editing(im)], ["original"]), [], [])),
            TAB_VARY: ([v_img], lambda im: (im,)),
            "interp_a": ([i_a], lambda im: (im,)),
            "interp_b": ([i_b], lambda im: (im,)),
            TAB_TEXTDIFF: ([t_img], lambda im: (im,)),
            TAB_PCA: ([p_img], lambda im: (im,)),
        }
        tab_of = {"interp_a": TAB_INTERP, "interp_b": TAB_INTERP}
        rows = {TAB_GENERATE: (g_send, TAB_GENERATE), "edit_cands": (e_send, "edit_cands"),
                TAB_VARY: (v_send, TAB_VARY), TAB_INTERP: (i_send, TAB_INTERP),
                TAB_TEXTDIFF: (t_send, TAB_TEXTDIFF), TAB_PCA: (p_send, TAB_PCA)}
        for _, (buttons, src) in rows.items():
            for target, button in buttons.items():
                comps, convert = targets[target]

                # Switch tabs first and give the page time to draw it: Gradio 5's ImageEditor
                # drops an image set before its canvas is up ("this.history.push is not a
                # function" in the browser console).
                button.click(handler(_switch(tab_of.get(target, target))),
                             [s[src], sel[src]], [tabs], **light).success(
                    handler(_sender(convert, EDITOR_SETTLE_S if target == TAB_EDIT else 0)),
                    [s[src], sel[src]], comps, **light)
    return demo


def _send_row(gr, prefix: str) -> dict:
    """Buttons that put the selected result into another tab's input."""
    gr.Markdown("Use the selected result (click it; default: the first) as the input of:",
                elem_classes=["unclip-note"])
    with gr.Row(elem_classes=["unclip-send"]):
        names = {TAB_EDIT: "Edit", TAB_VARY: "Variations", "interp_a": "Interpolate A",
                 "interp_b": "Interpolate B", TAB_TEXTDIFF: "Text diff", TAB_PCA: "PCA"}
        return {t: gr.Button(label, size="sm", min_width=60,
                          elem_id=f"{prefix}-to-{t}")
                for t, label in names.items()}


EDITOR_SETTLE_S = 2.0  # seconds the Edit canvas gets to start before an image is sent to it


def _switch(tab: str):
    def switch(results, index):
        H.pick(results, index)  # says "run this tab first" when there is nothing to send
        return gr.Tabs(selected=tab)
    return switch


def _sender(convert, settle_s: float = 0.0):
    def send(results, index):
        im = np.asarray(H.pick(results, index))
        if settle_s:
            time.sleep(settle_s)
        out = convert(im)
        # Gradio unpacks a returned tuple only for several outputs: one output gets the value
        return out[0] if len(out) == 1 else out
    return send


# ------------------------------------------------------------------------------ command line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="unclip studio",
        description="A local web app over the unCLIP pipelines (Gradio). Binds to "
                    f"{DEFAULT_HOST} unless --host says otherwise.")
    p.add_argument("--model", default=None,
                   help="model dir (default: the shipped model; 'random:tiny' for an "
                        "untrained tiny model)")
    p.add_argument("--host", default=DEFAULT_HOST,
                   help=f"address to bind (default {DEFAULT_HOST}: this machine only; "
                        "0.0.0.0 exposes it to your network)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")
    p.add_argument("--queue-size", type=int, default=DEFAULT_QUEUE_SIZE,
                   help="requests waiting at most; more are refused with a message "
                        f"(default {DEFAULT_QUEUE_SIZE})")
    p.add_argument("--num", type=int, default=4, help="initial number of images per run")
    p.add_argument("--prior-steps", type=int, default=None,
                   help="initial prior steps (default: the model's)")
    p.add_argument("--decoder-steps", type=int, default=None,
                   help="initial decoder steps (default: the model's)")
    p.add_argument("--sr-steps", type=int, default=None,
                   help="initial upsampler steps (default: the model's)")
    p.add_argument("--seed", type=int, default=0, help="initial seed")
    p.add_argument("--step-progress", action="store_true",
                   help="show each sampler step in the progress bar, not just the stage "
                        "(the samplers then carry a host callback, which JAX's persistent "
                        "compilation cache cannot reuse: every start compiles them anew)")
    return p


def launch(demo, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT,
           queue_size: int = DEFAULT_QUEUE_SIZE, block: bool = True):
    """Queue (bounded, one job at a time) and serve ``demo`` on ``host:port``."""
    demo.queue(max_size=int(queue_size), default_concurrency_limit=1)
    return demo.launch(server_name=host, server_port=int(port), share=False, inbrowser=False,
                       show_error=True, ssr_mode=False, show_api=False,
                       prevent_thread_lock=not block, quiet=False)


def studio_main(argv: Optional[Sequence[str]] = None) -> int:
    """``unclip studio [--model DIR] [--host H] [--port P] ...``: serve until interrupted.
    Returns the exit code (2 for bad arguments or a model that cannot be loaded)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help (0) or a bad argument (2)
        return int(e.code or 0)
    for name in ("num", "prior_steps", "decoder_steps", "sr_steps", "queue_size"):
        v = getattr(args, name)
        if v is not None and v < 1:
            print(f"unclip studio: error: --{name.replace('_', '-')} must be >= 1, got {v}",
                  file=sys.stderr)
            return 2
    from unclip_jax.cli import _user_errors, load_model
    from unclip_jax.utils.compile_cache import enable_compilation_cache

    enable_compilation_cache()
    try:
        model = load_model(args.model)
    except _user_errors() as e:
        print(f"unclip studio: error: {e}", file=sys.stderr)
        return 2
    defaults = StudioDefaults(num=args.num, prior_steps=args.prior_steps,
                              decoder_steps=args.decoder_steps, sr_steps=args.sr_steps,
                              seed=args.seed, step_progress=args.step_progress)
    demo = build_app(model, defaults)
    try:
        launch(demo, args.host, args.port, args.queue_size)
    except KeyboardInterrupt:
        pass
    except OSError as e:  # port in use
        print(f"unclip studio: error: {e}", file=sys.stderr)
        return 2
    return 0
