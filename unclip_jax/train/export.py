"""Trained stages -> a model dir; CLIP embeddings of a dataset (what ``unclip embed`` writes).

``export_model(config, {'clip': WORKDIR, 'prior': ..., 'decoder': ..., 'sr': ...}, OUT)`` writes
the *EMA* params of each stage's latest checkpoint in the UnCLIP model-dir format
(``pipelines.model.save``); a stage without a workdir keeps random init only with
``allow_random=True`` (the dir is then marked ``random_weights``), else ``ExportError``. A value
may also be a model dir, whose params for that stage are copied. ``sr`` may be given as
``sr`` (upsampler 0) or ``sr0``, ``sr1``, ...; a model dir as upsampler ``i`` gives its
upsampler ``i``, or its upsampler ``N`` when written ``DIR:N`` (the upsamplers are
convolutional, so one trained 32 -> 64 also serves 16 -> 32 at a smaller decoder size). An
``inpaint`` workdir becomes the model's inpainting decoder (``params['inpaint']``, used by
``unclip inpaint``). ``storage_dtype='bfloat16'`` halves the size on disk (the shipped model).

``embed_batches`` / ``embed_dataset``: CLIP image embedding, text embedding, token states and
mask of every example of a data source, once, for prior / decoder training (on a pod, every
process embeds its own shard of the data into the same folder).
"""
from __future__ import annotations

import json
import os
from typing import Any, Iterable, Iterator, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from unclip_jax import config as cfg_lib
from unclip_jax.checkpoint import Checkpointer
from unclip_jax.data import embeddings as embeddings_lib
from unclip_jax.train.losses import build_stage, clip_pixels

PyTree = Any


class ExportError(ValueError):
    """A stage is missing, or a workdir does not match the config."""


def _model_keys(cfg_json: Optional[dict]) -> dict:
    from unclip_jax.train.loop import training_identity

    return training_identity({k: v for k, v in (cfg_json or {}).items() if k not in ("train",)})


def _is_model_dir(path: str) -> bool:
    from unclip_jax.pipelines.model import META_FILE

    return os.path.isfile(os.path.join(path, META_FILE))


def load_stage_params(config, stage: str, path: str, *, ema: bool = True,
                      sr_index: int = 0, source_index: Optional[int] = None) -> PyTree:
    """Plain (unboxed, host-local) params of ``stage`` from ``path``: a train workdir (latest
    checkpoint; the EMA params unless ``ema=False``) or a model dir (for ``sr``: its upsampler
    ``source_index``, default ``sr_index``). The prior comes back as
    ``{'params', 'buffers'}``. Raises ``ExportError`` when the workdir's model config differs
    from ``config``'s."""
    from unclip_jax.train.loop import stage_config_json
    from unclip_jax.train.state import TrainState

    if _is_model_dir(path):
        from unclip_jax.pipelines import model as model_lib

        m = model_lib.load(path)
        if stage == "inpaint" and not m.has_inpaint_decoder:
            raise ExportError(f"{path} has no inpainting decoder")
        if stage != "sr":
            return m.params[stage]
        k = sr_index if source_index is None else source_index
        if not 0 <= k < len(m.params["sr"]):
            raise ExportError(f"{path} has {len(m.params['sr'])} upsampler(s); no upsampler {k}")
        return m.params["sr"][k]
    if source_index is not None:
        raise ExportError(f"{path}:{source_index}: ':N' picks an upsampler of a model dir; "
                          f"{path} is a train workdir")
    st = build_stage(stage, config, sr_index=sr_index)
    ckpt = Checkpointer(path, save_every=1 << 30, keep_last=None)
    try:
        if ckpt.latest_step() is None:
            raise ExportError(f"no checkpoint of stage {stage!r} in {path}")
        stored = ckpt.metadata().get("config")
        want = stage_config_json(config, stage)
        if _model_keys(stored) != _model_keys(want):
            from unclip_jax.checkpoint.manager import config_diff

            diffs = config_diff(_model_keys(stored), _model_keys(want))
            raise ExportError(f"{path}: its {stage} model config differs from the export config "
                              f"(stored -> now): {'; '.join(diffs)}")
        from unclip_jax.train.optim import make_optimizer

        # The optimizer state's structure does not depend on hyper-parameters we vary.
        opt = make_optimizer(_optimizer_like(stored, stage))
        abstract = jax.eval_shape(
            lambda r: TrainState.create(st.init(r), opt, r, use_ema=True), jax.random.PRNGKey(0))
        abstract = nn.meta.unbox(abstract)
        dev = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=dev),
                                abstract)
        tree = {"train": abstract}
        if jax.tree.leaves(st.frozen):
            tree["frozen"] = jax.tree.map(
                lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype, sharding=dev),
                st.frozen)
        try:
            restored = ckpt.restore(tree, check_config=False).state
        except Exception as e:  # noqa: BLE001 - e.g. ema disabled in that run
            tree["train"] = abstract.replace(ema_params=None)
            try:
                restored = ckpt.restore(tree, check_config=False).state
            except Exception:
                raise ExportError(f"cannot read the checkpoint in {path}: {e}") from e
        state = restored["train"]
        params = state.ema_params if (ema and state.ema_params is not None) else state.params
        params = jax.device_get(params)
        if stage == "prior":
            return {"params": params, "buffers": jax.device_get(restored["frozen"]["buffers"])}
        return params
    finally:
        ckpt.close()


def _optimizer_like(stored: Optional[dict], stage: str):
    """An optimizer with the same state structure as the stored run's (accumulation matters)."""
    train = (stored or {}).get("train", {})
    return dict(name="adamw", learning_rate=1e-4, warmup_steps=0,
                total_steps=max(2, int(train.get("total_steps", 2))),
                accum_steps=int(train.get("accum_steps", 1)),
                grad_clip_norm=train.get("grad_clip_norm", 1.0))


def split_sr_source(spec: str) -> tuple[str, Optional[int]]:
    """``'DIR'`` -> ``(DIR, None)``; ``'DIR:N'`` (DIR not itself a folder) -> ``(DIR, N)``."""
    head, sep, tail = spec.rpartition(":")
    if sep and tail.isdigit() and not os.path.isdir(spec):
        return head, int(tail)
    return spec, None


def _sr_workdirs(workdirs: Mapping[str, str], n_sr: int) -> dict[int, str]:
    out = {}
    for k, v in workdirs.items():
        if k == "sr":
            out[0] = v
        elif k.startswith("sr") and k[2:].isdigit():
            out[int(k[2:])] = v
    bad = [i for i in out if i >= n_sr]
    if bad:
        raise ExportError(f"config has {n_sr} upsampler(s); got workdirs for sr{bad}")
    return out


def export_model(config, workdirs: Mapping[str, str], out_dir: str, *,
                 allow_random: bool = False, seed: int = 0, ema: bool = True,
                 storage_dtype: str = "float32") -> str:
    """Write a model dir at ``out_dir`` from the trained stages in ``workdirs`` (stage -> train
    workdir or model dir). See the module docstring. Returns ``out_dir``."""
    from unclip_jax.pipelines import model as model_lib

    known = {"clip", "prior", "decoder", "sr", "inpaint"}
    unknown = [k for k in workdirs if k not in known and not (k.startswith("sr") and
                                                              k[2:].isdigit())]
    if unknown:
        raise ExportError(f"unknown stage(s) {unknown}; stages: clip, prior, decoder, sr[N], "
                          "inpaint")
    n_sr = len(cfg_lib.sr_configs(config))
    sr_dirs = _sr_workdirs(workdirs, n_sr)
    missing = [s for s in ("clip", "prior", "decoder") if not workdirs.get(s)]
    missing += [f"sr{i}" for i in range(n_sr) if i not in sr_dirs]
    if missing and not allow_random:
        raise ExportError(
            f"no trained weights for {missing}; train them (`unclip train STAGE`) or allow "
            "random init for them explicitly (allow_random=True / --allow-random)")
    if missing:
        params = model_lib.init_random(config, seed=seed).params
    else:
        params = {"clip": None, "prior": None, "decoder": None, "sr": [None] * n_sr}
    for s in ("clip", "prior", "decoder"):
        if workdirs.get(s):
            params[s] = load_stage_params(config, s, workdirs[s], ema=ema)
    for i, spec in sr_dirs.items():
        d, k = split_sr_source(spec)
        params["sr"][i] = load_stage_params(config, "sr", d, ema=ema, sr_index=i,
                                            source_index=k)
    if workdirs.get("inpaint"):
        params["inpaint"] = load_stage_params(config, "inpaint", workdirs["inpaint"], ema=ema)
    _check_shapes(config, params)
    model = model_lib.UnCLIP(config, params, tokenizer_dir=cfg_lib.tokenizer_dir(config),
                             random_weights=bool(missing),
                             source=f"export:{','.join(sorted(workdirs))}")
    model_lib.save(model, out_dir, storage_dtype=storage_dtype)
    if missing:
        with open(os.path.join(out_dir, "random_stages.json"), "w") as f:
            json.dump({"random_stages": missing}, f)
    return out_dir


def _check_shapes(config, params) -> None:
    """Every stage's params must have the shapes ``config`` gives (a model dir used as a source
    may hold another config's weights, e.g. the inpainting decoder of a model whose decoder
    config was since grown)."""
    from unclip_jax.pipelines import model as model_lib

    want = model_lib._abstract_params(config, inpaint="inpaint" in params)
    for stage in ("clip", "prior", "decoder", "sr") + (("inpaint",) if "inpaint" in params else ()):
        _compare_shapes(stage, want[stage], params[stage])


def _compare_shapes(stage: str, want, got) -> None:
    w = jax.tree_util.tree_flatten_with_path(want)[0]
    g = jax.tree_util.tree_flatten_with_path(got)[0]
    ws = {jax.tree_util.keystr(p): tuple(x.shape) for p, x in w}
    gs = {jax.tree_util.keystr(p): tuple(np.shape(x)) for p, x in g}
    if ws != gs:
        diff = sorted(k for k in set(ws) | set(gs) if ws.get(k) != gs.get(k))
        raise ExportError(f"{stage}: the weights do not fit the export config (e.g. "
                          f"{diff[:3]}: {[gs.get(k) for k in diff[:3]]} vs config "
                          f"{[ws.get(k) for k in diff[:3]]})")


def load_clip_params(config, model: Optional[str] = None, clip_workdir: Optional[str] = None,
                     ema: bool = True):
    """``(CLIPConfig, params)`` from a model dir (its own config) or a CLIP train workdir
    (``config``)."""
    if bool(model) == bool(clip_workdir):
        raise ExportError("give exactly one of a model dir (--model) or a CLIP workdir "
                          "(--clip-workdir)")
    if model:
        from unclip_jax.pipelines import model as model_lib

        m = model_lib.load(model)
        return m.clip_config, m.params["clip"], m.tokenizer_dir
    return (cfg_lib.clip_config(config), load_stage_params(config, "clip", clip_workdir, ema=ema),
            cfg_lib.tokenizer_dir(config))


def clip_encoder(clip_cfg, jit: bool = True):
    """``encode(params, images [B, H, W, 3] in [-1, 1], ids [B, L], mask [B, L])`` ->
    ``(image_emb [B, D], text_emb [B, D], text_states [B, L, W])``: the CLIP outputs that
    ``unclip embed`` stores (images resized to the vision tower's size here)."""
    from unclip_jax.models import clip as clip_lib

    model = clip_lib.CLIP(clip_cfg)
    size = clip_cfg.vision_config.image_size

    def encode(params, images, ids, mask):
        out = model.apply({"params": params}, input_ids=ids, pixel_values=clip_pixels(images, size),
                          attention_mask=mask)
        return out["image_embeds"], out["text_embeds"], out["text_states"]

    return jax.jit(encode) if jit else encode


def embed_batches(clip_cfg, clip_params, batches: Iterable[dict], *,
                  max_examples: Optional[int] = None, store_image_size: Optional[int] = None,
                  tokenizer_dir: Optional[str] = None, progress: bool = True) -> Iterator[dict]:
    """For each host batch (``image`` in [-1, 1], ``caption`` strings) yield ``image`` (uint8,
    resized to ``store_image_size`` if given), ``caption``, ``input_ids``, ``image_emb``,
    ``text_emb``, ``text_states``, ``text_mask``; stops after ``max_examples``."""
    from tqdm.auto import tqdm

    from unclip_jax.models.tokenizer import load_tokenizer, tokenize_with_info
    from unclip_jax.train.losses import resize_images

    length = clip_cfg.text_config.max_position_embeddings
    tok = load_tokenizer(tokenizer_dir, length) if tokenizer_dir else None

    clip_encode = clip_encoder(clip_cfg, jit=False)

    @jax.jit
    def encode(params, images, ids, mask):
        stored = images if store_image_size is None else resize_images(images, store_image_size)
        stored = jnp.clip(jnp.round((stored + 1.0) * 127.5), 0, 255).astype(jnp.uint8)
        return (*clip_encode(params, images, ids, mask), stored)

    done = 0
    bar = tqdm(total=max_examples, desc="embed", unit="img", disable=not progress)
    try:
        for b in batches:
            captions = [str(c) for c in b["caption"]]
            toks = tokenize_with_info(captions, length, tokenizer=tok)
            img_emb, txt_emb, states, stored = jax.device_get(encode(
                clip_params, jnp.asarray(b["image"], jnp.float32), jnp.asarray(toks.ids),
                jnp.asarray(toks.mask)))
            n = len(captions)
            if max_examples is not None:
                n = min(n, max_examples - done)
            yield {"image": stored[:n], "caption": np.array(captions[:n]),
                   "input_ids": toks.ids[:n], "image_emb": img_emb[:n], "text_emb": txt_emb[:n],
                   "text_states": states[:n], "text_mask": toks.mask[:n].astype(np.int32)}
            done += n
            bar.update(n)
            if max_examples is not None and done >= max_examples:
                break
    finally:
        bar.close()


def embed_dataset(clip_cfg, clip_params, batches: Iterable[dict], out_dir: str, *,
                  max_examples: Optional[int] = None, store_image_size: Optional[int] = None,
                  tokenizer_dir: Optional[str] = None, progress: bool = True,
                  meta: Optional[dict] = None,
                  shard_size: int = embeddings_lib.DEFAULT_SHARD_SIZE) -> dict:
    """``embed_batches`` written as an embeddings dir (``loop.EmbeddingDataset`` reads it).

    Every process calls it with its own ``batches`` (its shard of the data); each writes shards
    named by its process index into ``out_dir`` (shared, e.g. ``gs://``), process 0 the meta
    (``data.embeddings.write_embeddings``). ``max_examples`` counts this process's examples."""
    return embeddings_lib.write_embeddings(out_dir, embed_batches(
        clip_cfg, clip_params, batches, max_examples=max_examples,
        store_image_size=store_image_size, tokenizer_dir=tokenizer_dir, progress=progress),
        meta=meta, shard_size=shard_size)


__all__ = ["export_model", "load_stage_params", "load_clip_params", "clip_encoder",
           "embed_batches", "embed_dataset", "ExportError"]
