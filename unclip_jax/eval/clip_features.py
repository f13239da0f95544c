"""An *evaluation* CLIP: our CLIP module + params trained separately from the CLIP the model
conditions on (other seed and config, ``experiments/emoji_eval_clip.py``), so that scores
cannot be gamed by a decoder that learned to please its own encoder.

``EvalCLIP.embed_images`` / ``embed_captions`` run in fixed-size batches (the last one padded),
so each jitted forward compiles once. Images are preprocessed exactly as CLIP training and
``unclip embed`` do it (``train.losses.clip_pixels``: [-1, 1] -> antialiased linear resize ->
CLIP normalisation). Features come back L2-normalised (float32 numpy) unless ``normalize=False``.

``load_eval_clip(spec)`` takes a model dir (its ``clip`` params and tokenizer), a CLIP train
workdir (``unclip train clip --config experiments/emoji_eval_clip.py --workdir DIR``; the EMA
params of its latest checkpoint), a ``unclip train all`` workdir (its ``clip/``), or
``random:CONFIG.py`` (random init; smoke tests only).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from unclip_jax.models import clip as clip_lib
from unclip_jax.utils.batching import padded_batches

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULT_EVAL_CLIP_CONFIG = os.path.join(REPO_ROOT, "experiments", "emoji_eval_clip.py")
ASSETS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets")
RANDOM_PREFIX = "random:"


def tokenizer_dir_for(config) -> str:
    """The tokenizer a config names (``config.tokenizer``: a folder under unclip_jax/assets or
    a path); the default CLIP BPE when it names none."""
    from unclip_jax.models.tokenizer import DEFAULT_TOKENIZER_DIR

    name = config.get("tokenizer") if hasattr(config, "get") else None
    if not name:
        return DEFAULT_TOKENIZER_DIR
    for cand in (name, os.path.join(ASSETS, name)):
        if os.path.isdir(cand):
            return os.path.abspath(cand)
    raise FileNotFoundError(f"tokenizer {name!r} not found (neither a folder nor under {ASSETS})")


@dataclasses.dataclass
class EvalCLIP:
    """A CLIP used only to score samples. ``config``: ``CLIPConfig``; ``params``: its plain
    params; ``tokenizer_dir``: the tokenizer it was trained with."""

    config: clip_lib.CLIPConfig
    params: dict
    tokenizer_dir: Optional[str] = None
    batch_size: int = 64
    source: str = ""

    def __post_init__(self):
        self.module = clip_lib.CLIP(self.config)
        size = self.config.vision_config.image_size

        def enc_img(params, images):
            from unclip_jax.train.losses import clip_pixels

            return self.module.apply({"params": params}, clip_pixels(images, size),
                                     method="encode_image")

        def enc_txt(params, ids, mask):
            return self.module.apply({"params": params}, ids, mask, method="encode_text")

        self._enc_img = jax.jit(enc_img)
        self._enc_txt = jax.jit(enc_txt)
        self._tok = None

    @property
    def image_size(self) -> int:
        return self.config.vision_config.image_size

    def embed_images(self, images_uint8, normalize: bool = True) -> np.ndarray:
        """uint8 ``[N, H, W, 3]`` (one size) -> features ``[N, D]``."""
        x = np.asarray(images_uint8)
        if x.dtype != np.uint8 or x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"expected uint8 [N, H, W, 3] images, got {x.dtype} {x.shape}")
        out = []
        for _, n, idx in padded_batches(x.shape[0], self.batch_size):
            xb = x[idx].astype(np.float32) / 127.5 - 1.0
            out.append(np.asarray(self._enc_img(self.params, jnp.asarray(xb)))[:n])
        f = np.concatenate(out, 0) if out else np.zeros((0, self.config.projection_dim))
        return _finish(f, normalize)

    def embed_captions(self, captions: Sequence[str], normalize: bool = True) -> np.ndarray:
        """Captions -> features ``[N, D]`` (tokenized with the eval CLIP's tokenizer)."""
        from unclip_jax.models.tokenizer import load_tokenizer, tokenize_with_info

        length = self.config.text_config.max_position_embeddings
        if self._tok is None and self.tokenizer_dir:
            self._tok = load_tokenizer(self.tokenizer_dir, length)
        captions = [str(c) for c in captions]
        out = []
        for _, n, idx in padded_batches(len(captions), self.batch_size):
            toks = tokenize_with_info([captions[k] for k in idx], length, tokenizer=self._tok)
            out.append(np.asarray(self._enc_txt(self.params, jnp.asarray(toks.ids),
                                                jnp.asarray(toks.mask)))[:n])
        f = np.concatenate(out, 0) if out else np.zeros((0, self.config.projection_dim))
        return _finish(f, normalize)


def _finish(f: np.ndarray, normalize: bool) -> np.ndarray:
    f = np.asarray(f, np.float32)
    if normalize:
        f = f / np.maximum(np.linalg.norm(f, axis=-1, keepdims=True), 1e-12)
    return f


def random_eval_clip(config, seed: int = 1, **kw) -> EvalCLIP:
    """A randomly initialised eval CLIP from an experiments config (tests / smoke runs)."""
    import flax.linen as nn

    from unclip_jax import config as cfg_lib

    ccfg = cfg_lib.clip_config(config)
    params = nn.meta.unbox(clip_lib.init_params(ccfg, jax.random.key(seed)))
    return EvalCLIP(ccfg, params, tokenizer_dir_for(config), source=f"random:{seed}", **kw)


def load_eval_clip(spec: str, config_path: Optional[str] = None, *, ema: bool = True,
                   batch_size: int = 64, seed: int = 1) -> EvalCLIP:
    """See the module docstring. ``config_path``: the experiments file the CLIP workdir was
    trained with (default ``experiments/emoji_eval_clip.py``)."""
    from unclip_jax import config as cfg_lib
    from unclip_jax.pipelines import model as model_lib

    if spec.startswith(RANDOM_PREFIX):
        path = spec[len(RANDOM_PREFIX):] or config_path or DEFAULT_EVAL_CLIP_CONFIG
        return random_eval_clip(cfg_lib.load_config_file(path), seed=seed, batch_size=batch_size)
    path = os.path.abspath(spec)
    if os.path.isfile(os.path.join(path, model_lib.META_FILE)):
        m = model_lib.load(path)
        return EvalCLIP(m.clip_config, m.params["clip"], m.tokenizer_dir, batch_size=batch_size,
                        source=path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"--eval-clip {spec}: not found")
    if os.path.isdir(os.path.join(path, "clip")):   # `unclip train all` workdir
        path = os.path.join(path, "clip")
    from unclip_jax.train.export import load_stage_params

    config = cfg_lib.load_config_file(config_path or DEFAULT_EVAL_CLIP_CONFIG)
    params = load_stage_params(config, "clip", path, ema=ema)
    return EvalCLIP(cfg_lib.clip_config(config), params, tokenizer_dir_for(config),
                    batch_size=batch_size, source=path)


def same_clip(a_params, b_params) -> bool:
    """True when two CLIP param trees are identical (refuse to score with the model's own
    CLIP)."""
    la, lb = jax.tree.leaves(a_params), jax.tree.leaves(b_params)
    if len(la) != len(lb):
        return False
    return all(np.shape(x) == np.shape(y) and np.array_equal(np.asarray(x), np.asarray(y))
               for x, y in zip(la, lb))


__all__ = ["EvalCLIP", "load_eval_clip", "random_eval_clip", "tokenizer_dir_for", "same_clip",
           "DEFAULT_EVAL_CLIP_CONFIG"]
