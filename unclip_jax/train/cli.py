"""``unclip train`` and ``unclip embed`` (wired into the ``unclip`` command by ``unclip_jax.cli``).

    unclip train STAGE --config experiments/X.py [--config.a.b=VALUE ...] --workdir DIR
                 [--steps N] [--data SPEC] [--eval-data SPEC]
        STAGE: clip | prior | decoder | sr | inpaint | all. Resumes from DIR's latest checkpoint;
        --steps is the step count to reach (default train.STAGE.total_steps). --eval-data (same
        syntax as --data; a single STAGE only) is evaluated every train.STAGE.eval_every steps
        on train.STAGE.eval_batches batches (eval_* metrics). ``all`` trains
        clip, embeds the data with it, then prior, decoder, sr (and inpaint when
        train.inpaint.init_from is 'decoder'), each in DIR/STAGE, and exports DIR/model.
    unclip embed (--model DIR | --config X.py --clip-workdir DIR) --data SPEC --out DIR
                 [--max-examples N] [--batch-size N] [--image-size N]
    unclip export --config X.py --workdir DIR --out MODEL_DIR [--STAGE DIR ...]
                 [--storage-dtype bfloat16]
        Writes the EMA weights of the stages trained in DIR/{clip,prior,decoder,sr,inpaint}
        (or the dirs given per stage) as a model dir; storage dtype default: the config's
        ``storage_dtype`` (float32 when absent).

Overrides take their type from the existing config value (``--config.train.prior.batch_size=16``,
``--config.train.sr.blur_sigma=(0.3,0.5)``, ``--config.dtype=bfloat16``); unknown keys raise
``ConfigError`` (the ``unclip`` command maps it to exit code 2; so are checkpoints in the workdir
that cannot be resumed). Exit codes: 0 done or preempted (checkpoint saved), 2 bad input,
3 too many non-finite losses in a row.
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import os
import sys
from typing import Any, Optional, Sequence

EXIT_NONFINITE = 3
TRAIN_STAGES = ("clip", "prior", "decoder", "sr", "inpaint", "all")
# --eval-data is opened with seed train.STAGE.seed + this, so that a synthetic eval stream (or a
# shuffled eval set) is not the training stream's first batches
EVAL_SEED_OFFSET = 1
# train.STAGE keys a config file may leave out: their defaults (``TrainConfig``'s for the eval keys)
OPTIONAL_TRAIN_KEYS = ("init_from", "init_partial", "eval_every", "eval_batches", "async_save",
                       "resized_crop_scale", "resized_crop_ratio", "corruption")


def _parse_value(old: Any, text: str, key: str):
    from unclip_jax.config import ConfigError

    if isinstance(old, bool):
        low = text.strip().lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"--config.{key}: expected a boolean, got {text!r}")
    if isinstance(old, int):
        try:
            return int(text)
        except ValueError:
            raise ConfigError(f"--config.{key}: expected an integer, got {text!r}") from None
    if isinstance(old, float):
        try:
            return float(text)
        except ValueError:
            raise ConfigError(f"--config.{key}: expected a number, got {text!r}") from None
    if isinstance(old, str):
        return text
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        if old is None:
            return text
        raise ConfigError(f"--config.{key}: cannot parse {text!r} as a "
                          f"{type(old).__name__}") from None
    if isinstance(old, (tuple, list)):
        if not isinstance(value, (tuple, list)):
            value = (value,)
        return type(old)(value)
    return value


def split_overrides(argv: Sequence[str]) -> tuple[list[str], dict[str, str]]:
    """Separate ``--config.a.b=v`` / ``--config.a.b v`` from the other arguments."""
    rest, overrides = [], {}
    argv = list(argv)
    i = 0
    while i < len(argv):
        a = argv[i]
        if a.startswith("--config."):
            if "=" in a:
                k, v = a[len("--config."):].split("=", 1)
            else:
                if i + 1 >= len(argv):
                    from unclip_jax.config import ConfigError

                    raise ConfigError(f"{a} needs a value")
                k, v = a[len("--config."):], argv[i + 1]
                i += 1
            overrides[k] = v
        else:
            rest.append(a)
        i += 1
    return rest, overrides


_MISSING = object()


def _model_field_default(parts: Sequence[str]):
    """The default of ``decoder.FIELD`` when FIELD is a ``UNetConfig`` field (config files list
    only the fields they change, so ``--config.decoder.attention_impl=cudnn`` must still work),
    of ``train.STAGE.init_from`` (``""``: start from scratch), ``train.STAGE.init_partial``
    (``False``), ``train.STAGE.eval_every`` / ``eval_batches`` / ``async_save``
    (``TrainConfig``'s defaults),
    ``train.STAGE.resized_crop_scale`` (``None``: off) / ``resized_crop_ratio`` and
    ``train.sr.corruption`` (``"blur"``; the stages that take them);
    ``_MISSING`` otherwise.
    Tuples become lists' parse targets; dtypes are not overridable here."""
    import dataclasses

    from unclip_jax.models.unet import UNetConfig

    if len(parts) == 3 and parts[0] == "train" and parts[2] in OPTIONAL_TRAIN_KEYS:
        from unclip_jax.train.loop import STAGE_KEYS, TrainConfig

        if parts[1] not in STAGE_KEYS:
            return _MISSING
        if parts[2] in ("eval_every", "eval_batches", "async_save"):
            return getattr(TrainConfig(stage=parts[1]), parts[2])
        if parts[2] not in STAGE_KEYS[parts[1]]:
            return _MISSING
        from unclip_jax.data import augment

        defaults = {"init_from": "", "init_partial": False, "resized_crop_scale": None,
                    "resized_crop_ratio": tuple(augment.CROP_RATIO), "corruption": "blur"}
        return defaults[parts[2]]
    if len(parts) != 2 or parts[0] != "decoder":
        return _MISSING
    fields = {f.name: f for f in dataclasses.fields(UNetConfig)}
    f = fields.get(parts[1])
    if f is None or parts[1] in ("dtype", "param_dtype"):
        return _MISSING
    return getattr(UNetConfig(), f.name)


def load_config(path: str, overrides: dict[str, str]):
    """``load_config_file`` with string overrides typed from the existing values."""
    from unclip_jax.config import ConfigError, load_config_file

    config = load_config_file(path)
    for key, text in overrides.items():
        node = config
        parts = key.split(".")
        for p in parts[:-1]:
            if not hasattr(node, "keys") or p not in node:
                raise ConfigError(f"unknown config key {key!r} (no section {p!r})")
            node = node[p]
        default = _model_field_default(parts)
        if hasattr(node, "keys") and parts[-1] not in node and default is not _MISSING:
            with node.unlocked() if hasattr(node, "unlocked") else contextlib.nullcontext():
                node[parts[-1]] = default  # a key the file leaves at its default
        if not hasattr(node, "keys") or parts[-1] not in node:
            keys = sorted(node.keys()) if hasattr(node, "keys") else []
            raise ConfigError(f"unknown config key {key!r}; keys here: {keys}")
        old = node[parts[-1]]
        if hasattr(old, "keys"):
            raise ConfigError(f"--config.{key} is a section; set one of its keys "
                              f"({sorted(old.keys())})")
        try:
            node[parts[-1]] = _parse_value(old, text, key)
        except TypeError as e:  # ConfigDict type checks
            raise ConfigError(f"--config.{key}={text}: {e}") from None
    return config


def _train_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="unclip train", description=__doc__.split("\n\n")[1])
    p.add_argument("stage", choices=TRAIN_STAGES)
    p.add_argument("--config", required=True, help="experiments/*.py config file")
    p.add_argument("--workdir", required=True, help="checkpoints, metrics.jsonl (resumable)")
    p.add_argument("--steps", type=int, default=None,
                   help="train until this step (default: train.STAGE.total_steps)")
    p.add_argument("--data", default="synthetic",
                   help="'synthetic[:SIZE]', an `unclip embed` output dir, or a dataset spec "
                        "for unclip_jax.data (default: synthetic)")
    p.add_argument("--eval-data", default=None, metavar="SPEC",
                   help="held-out data, same syntax as --data; evaluated every "
                        "train.STAGE.eval_every steps (needed when that is > 0)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _run_stage(stage: str, config, workdir: str, data_spec: str, steps: Optional[int],
               progress: bool, eval_spec: Optional[str] = None):
    import jax

    from unclip_jax.train.loop import open_data, train, train_config

    tc = train_config(config, stage)
    local = tc.batch_size // jax.process_count()
    data = open_data(data_spec, stage, config, local, seed=tc.seed)
    eval_data = None
    if eval_spec and tc.eval_every <= 0:
        from unclip_jax.config import ConfigError

        raise ConfigError(f"--eval-data is given but train.{stage}.eval_every is 0 (no eval): "
                          f"add --config.train.{stage}.eval_every=N to evaluate every N steps")
    if eval_spec:
        eval_data = open_data(eval_spec, stage, config, local, seed=tc.seed + EVAL_SEED_OFFSET)
    return train(stage, config, workdir, data, steps=steps, progress=progress,
                 eval_data=eval_data)


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split())


def train_main(argv: Optional[Sequence[str]] = None) -> int:
    """``unclip train``; returns the exit code (raises ConfigError for bad config / keys)."""
    from unclip_jax.checkpoint import CheckpointError, CheckpointFormatError, ConfigMismatchError
    from unclip_jax.config import ConfigError
    from unclip_jax.parallel.mesh import maybe_initialize_distributed
    from unclip_jax.train.export import ExportError
    from unclip_jax.train.loop import NonFiniteLossError

    rest, overrides = split_overrides(sys.argv[1:] if argv is None else argv)
    args = _train_parser().parse_args(rest)
    config = load_config(args.config, overrides)
    maybe_initialize_distributed()
    from unclip_jax.utils.compile_cache import enable_compilation_cache

    enable_compilation_cache()
    progress = not args.no_progress
    if args.eval_data and args.stage == "all":
        raise ConfigError("--eval-data works with a single STAGE, not 'all': train the stages one "
                          "by one to evaluate them (or set train.STAGE.eval_every=0)")
    try:
        if args.stage != "all":
            res = _run_stage(args.stage, config, args.workdir, args.data, args.steps, progress,
                             eval_spec=args.eval_data)
            _say(f"{args.stage}: step {res.step}" + (" (preempted; checkpoint saved, rerun the "
                                                     "same command to resume)"
                                                     if res.preempted else " done")
                 + f"; metrics in {os.path.join(args.workdir, 'metrics.jsonl')}")
            return 0
        return _train_all(config, args, progress)
    except NonFiniteLossError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_NONFINITE
    except ConfigMismatchError as e:
        stage = "STAGE" if args.stage == "all" else args.stage
        raise ConfigError(
            f"{e} From the command line: resume with the same --config.* overrides as the run "
            f"that wrote {args.workdir} (--steps N stops earlier without changing the schedule), "
            f"or continue under new settings in a new workdir: --workdir NEW "
            f"--config.train.{stage}.init_from={args.workdir} (the weights carry over, the "
            f"optimizer and schedule start afresh).") from None
    except CheckpointFormatError as e:
        raise ConfigError(
            f"{_one_line(e)}. Resume it with the unclip_jax version that wrote it, or train in a "
            "new --workdir.") from None
    except CheckpointError as e:
        raise ConfigError(
            f"{_one_line(e)}. The checkpoint is incomplete or holds another model: move that step "
            "folder (named above) out of its workdir to resume from the one before, or train in "
            "a new --workdir.") from None
    except ExportError as e:
        raise ConfigError(str(e)) from None


def _train_all(config, args, progress: bool) -> int:
    from unclip_jax import config as cfg_lib
    from unclip_jax.config import ConfigError
    from unclip_jax.data.embeddings import is_embeddings_dir
    from unclip_jax.train.export import embed_dataset, export_model, load_clip_params
    from unclip_jax.train.loop import open_data, train_config
    from unclip_jax.utils.paths import is_remote

    if is_remote(args.workdir):  # checked before any training: `all` ends with a local model dir
        raise ConfigError(f"unclip train all writes its model dir to local disk; give a local "
                          f"--workdir, not {args.workdir} (or train the stages one by one with "
                          "`unclip train STAGE --workdir gs://...` and `unclip export --out DIR`)")
    wd = os.path.abspath(args.workdir)
    dirs = {s: os.path.join(wd, s) for s in ("clip", "prior", "decoder", "sr", "inpaint")}
    res = _run_stage("clip", config, dirs["clip"], args.data, args.steps, progress)
    if res.preempted:
        return 0
    emb_dir = os.path.join(wd, "embeddings")
    if not is_embeddings_dir(emb_dir):
        ccfg, params, tok = load_clip_params(config, clip_workdir=dirs["clip"])
        tc = train_config(config, "decoder")
        src = open_data(args.data, "clip", config, tc.batch_size, seed=tc.seed, one_pass=True)
        n = getattr(src, "num_examples", None) or 64 * tc.batch_size
        size = max([cfg_lib.decoder_config(config).image_size]
                   + [s.image_size for s in cfg_lib.sr_configs(config)])
        embed_dataset(ccfg, params, iter(src), emb_dir, max_examples=int(n),
                      store_image_size=size, tokenizer_dir=tok, progress=progress)
    for stage, data in (("prior", emb_dir), ("decoder", emb_dir), ("sr", emb_dir)):
        if stage == "sr" and not cfg_lib.sr_configs(config):
            continue
        res = _run_stage(stage, config, dirs[stage], data, args.steps, progress)
        if res.preempted:
            return 0
    workdirs = {s: dirs[s] for s in ("clip", "prior", "decoder")}
    if cfg_lib.sr_configs(config):
        workdirs["sr"] = dirs["sr"]
    if config.train.get("inpaint") and config.train.inpaint.get("init_from") == "decoder":
        config.train.inpaint.init_from = dirs["decoder"]
        res = _run_stage("inpaint", config, dirs["inpaint"], emb_dir, args.steps, progress)
        if res.preempted:
            return 0
        workdirs["inpaint"] = dirs["inpaint"]
    out = os.path.join(wd, "model")
    if not os.path.isfile(os.path.join(out, "unclip.json")):
        n_sr = len(cfg_lib.sr_configs(config))
        export_model(config, workdirs, out, allow_random=n_sr > 1,
                     storage_dtype=config.get("storage_dtype", "float32"))
    _say(f"all stages trained; model dir: {out}")
    return 0


def _say(msg: str) -> None:
    import jax

    if jax.process_index() == 0:
        print(msg, file=sys.stderr, flush=True)


def _embed_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="unclip embed",
        description="Precompute CLIP image / text embeddings and caption token states of a "
                    "dataset once, for prior / decoder training (`unclip train prior --data OUT`).")
    p.add_argument("--model", default=None, help="model dir whose CLIP to use")
    p.add_argument("--config", default=None, help="config file (with --clip-workdir)")
    p.add_argument("--clip-workdir", default=None, help="a `unclip train clip` workdir")
    p.add_argument("--data", required=True, help="dataset spec (as for `unclip train`)")
    p.add_argument("--out", required=True, help="output dir (new)")
    p.add_argument("--max-examples", type=int, default=None,
                   help="examples to embed (default: the dataset's size, if it knows it)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--passes", type=int, default=1,
                   help="passes over the data; each draws another caption per image (tfds "
                        "data), so the prior sees several captions of each image")
    p.add_argument("--image-size", type=int, default=None,
                   help="store images at this size (default: the largest decoder / upsampler "
                        "size of the config)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    return p


def embed_main(argv: Optional[Sequence[str]] = None) -> int:
    """``unclip embed``; returns the exit code (raises ConfigError / ModelDirError / ExportError
    for bad input)."""
    import ml_collections

    from unclip_jax import config as cfg_lib
    from unclip_jax.config import ConfigError
    from unclip_jax.train.export import embed_dataset, load_clip_params
    from unclip_jax.train.loop import open_data

    rest, overrides = split_overrides(sys.argv[1:] if argv is None else argv)
    args = _embed_parser().parse_args(rest)
    if bool(args.model) == bool(args.clip_workdir):
        raise ConfigError("unclip embed: give --model DIR or --clip-workdir DIR (with --config)")
    if args.clip_workdir and not args.config:
        raise ConfigError("unclip embed --clip-workdir needs --config (the CLIP run's config)")
    from unclip_jax.parallel.mesh import maybe_initialize_distributed

    # on a pod every process embeds its own shard of the data and writes its own shard files
    maybe_initialize_distributed()
    from unclip_jax.utils.compile_cache import enable_compilation_cache

    enable_compilation_cache()
    if args.config:
        config = load_config(args.config, overrides)
    else:
        from unclip_jax.pipelines.model import read_meta

        config = ml_collections.ConfigDict(read_meta(args.model)["config"])
        if overrides:
            raise ConfigError("--config.* overrides need --config")
    from unclip_jax.train.export import ExportError

    try:
        ccfg, params, tok = load_clip_params(config, model=args.model,
                                             clip_workdir=args.clip_workdir)
    except ExportError as e:
        raise ConfigError(str(e)) from None
    if args.passes < 1:
        raise ConfigError(f"--passes must be >= 1, got {args.passes}")
    src = open_data(args.data, "clip", config, args.batch_size, seed=args.seed, one_pass=True,
                    passes=args.passes)
    n = args.max_examples or getattr(src, "num_examples", None)
    if not n:
        raise ConfigError(f"--data {args.data}: the dataset does not say how many examples it "
                          "has; pass --max-examples N")
    size = args.image_size or max([cfg_lib.decoder_config(config).image_size]
                                  + [s.image_size for s in cfg_lib.sr_configs(config)])
    meta = embed_dataset(ccfg, params, iter(src), args.out, max_examples=int(n),
                         store_image_size=size, tokenizer_dir=tok,
                         progress=not args.no_progress,
                         meta={"source": args.data, "clip": args.model or args.clip_workdir})
    print(f"wrote {meta['num_examples']} examples to {args.out}", file=sys.stderr)
    return 0


def _export_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="unclip export",
        description="Write a model dir (what --model takes) from trained stages.")
    p.add_argument("--config", required=True, help="the config the stages were trained with")
    p.add_argument("--workdir", default=None,
                   help="folder holding clip/ prior/ decoder/ sr/ [inpaint/] train workdirs")
    for s in ("clip", "prior", "decoder", "inpaint"):
        p.add_argument(f"--{s}", default=None, metavar="DIR",
                       help=f"{s} train workdir or model dir (default: WORKDIR/{s})")
    p.add_argument("--sr", action="append", default=None, metavar="DIR[:N]",
                   help="upsampler train workdir or model dir (default: WORKDIR/sr); once per "
                        "upsampler, in order. A model dir's upsampler i fills upsampler i, "
                        "or its upsampler N with DIR:N")
    p.add_argument("--out", required=True, help="new model dir")
    p.add_argument("--storage-dtype", choices=("float32", "bfloat16"), default=None,
                   help="dtype of the stored weights (default: config.storage_dtype or float32)")
    p.add_argument("--pca-from", default=None, metavar="EMB_DIR",
                   help="also ship a PCA basis of the CLIP image embeddings of this `unclip "
                        "embed` dir (pca.npz: `unclip pca` then needs no --basis)")
    return p


def export_main(argv: Optional[Sequence[str]] = None) -> int:
    """``unclip export``; returns the exit code (ConfigError for a missing stage)."""
    import numpy as np

    from unclip_jax.config import ConfigError
    from unclip_jax.train.export import ExportError, export_model, split_sr_source

    rest, overrides = split_overrides(sys.argv[1:] if argv is None else argv)
    args = _export_parser().parse_args(rest)
    config = load_config(args.config, overrides)
    workdirs = {}
    for s in ("clip", "prior", "decoder", "inpaint"):
        d = getattr(args, s) or (os.path.join(args.workdir, s) if args.workdir else None)
        if d and os.path.isdir(d):
            workdirs[s] = d
        elif getattr(args, s):
            raise ConfigError(f"--{s} {getattr(args, s)}: no such folder")
    if args.sr:
        for i, spec in enumerate(args.sr):
            if not os.path.isdir(split_sr_source(spec)[0]):
                raise ConfigError(f"--sr {spec}: no such folder")
            workdirs[f"sr{i}"] = spec
    elif args.workdir and os.path.isdir(os.path.join(args.workdir, "sr")):
        workdirs["sr"] = os.path.join(args.workdir, "sr")
    dtype = args.storage_dtype or config.get("storage_dtype", "float32")
    emb = None
    if args.pca_from:
        from unclip_jax.train.loop import EmbeddingDataset

        try:
            ds = EmbeddingDataset(args.pca_from, batch_size=1, keys=("image_emb",))
        except FileNotFoundError as e:
            raise ConfigError(f"--pca-from: {e}") from None
        emb = ds.arrays["image_emb"]
    try:
        out = export_model(config, workdirs, args.out, storage_dtype=dtype)
    except ExportError as e:
        raise ConfigError(str(e)) from None
    if emb is not None:
        from unclip_jax.pipelines.model import PCA_FILE, save_pca
        from unclip_jax.pipelines.pca import fit_basis

        # unique rows: an embed with --passes N repeats every image N times
        save_pca(fit_basis(np.unique(emb, axis=0)), os.path.join(out, PCA_FILE))
    _say(f"wrote model dir {out} (stages: {', '.join(sorted(workdirs))}; weights stored as "
         f"{dtype})")
    return 0


if __name__ == "__main__":  # pragma: no cover
    cmd, *rest_argv = sys.argv[1:]
    sys.exit({"train": train_main, "embed": embed_main, "export": export_main}[cmd](rest_argv))
