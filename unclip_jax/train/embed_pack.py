"""Carry an ``unclip embed`` dir to another machine in a small file, and rebuild it there.

An embeddings dir is dominated by the caption token states (``[N, L, W]`` float32) and by the
images, which repeat once per ``--passes``. ``pack`` keeps only what cannot be recomputed: each
distinct image once (uint8), the index of every example's image, the caption, its token ids and
mask (compressed npz; the emoji set's 764 MB dir packs into ~20 MB). ``unpack`` re-runs the same
CLIP on that (``export.clip_encoder``, the function ``unclip embed`` uses) and writes an
embeddings dir that ``EmbeddingDataset`` reads: images, captions, ids and masks are identical,
the embeddings equal up to the float rounding of the device that recomputes them. (Image
embeddings are recomputed from the *stored* images: the same input when `unclip embed` stored
them at the data's own size, as for the emoji set; else from the resized copies.)

    python -m unclip_jax.train.embed_pack pack EMB_DIR OUT.npz
    python -m unclip_jax.train.embed_pack unpack OUT.npz --model MODEL_DIR --out NEW_EMB_DIR

The CLIP must be the one that made the dir (``--model`` / the dir's ``clip`` meta entry);
``unpack`` checks the token length and the image size against it.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Iterator, Optional, Sequence

import numpy as np

PACK_FORMAT = "unclip_jax.embeddings_pack"
PACK_VERSION = 1
# what unpack recomputes with CLIP (everything else is stored)
RECOMPUTED = ("image_emb", "text_emb", "text_states")
STORED = ("caption", "input_ids", "text_mask")


def _load_dir(emb_dir: str) -> tuple[dict, dict]:
    from unclip_jax.data import embeddings

    meta = embeddings.read_meta(emb_dir)
    parts = embeddings.read_arrays(emb_dir)
    missing = {"image", *STORED} - set(parts)
    if missing:
        raise ValueError(f"{emb_dir}: no {sorted(missing)} arrays; pack needs the images, "
                         "captions and token ids of an `unclip embed` dir")
    return meta, parts


def pack(emb_dir: str, out_file: str) -> dict:
    """Write ``out_file`` (compressed npz) from ``emb_dir``; returns its meta dict."""
    meta, arrays = _load_dir(emb_dir)
    images = np.ascontiguousarray(arrays["image"])
    n = len(images)
    rows = images.reshape(n, -1).view(np.dtype((np.void, images[0].nbytes))).ravel()
    _, first, index = np.unique(rows, return_index=True, return_inverse=True)
    # keep distinct images in order of first appearance (stable, easy to read back)
    order = np.argsort(first)
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    ids = arrays["input_ids"]
    ids_dtype = np.int16 if ids.size == 0 or (ids.min() >= -2**15 and ids.max() < 2**15) \
        else ids.dtype
    pack_meta = dict(format=PACK_FORMAT, format_version=PACK_VERSION, num_examples=n,
                     num_images=int(len(order)), source_meta=meta,
                     arrays={k: [list(arrays[k].shape[1:]), str(arrays[k].dtype)]
                             for k in arrays})
    os.makedirs(os.path.dirname(os.path.abspath(out_file)), exist_ok=True)
    with open(out_file, "wb") as f:
        np.savez_compressed(
            f, images=images[first[order]], image_index=rank[index.ravel()].astype(np.int32),
            caption=arrays["caption"].astype(str), input_ids=ids.astype(ids_dtype),
            text_mask=arrays["text_mask"].astype(bool), meta=np.array(json.dumps(pack_meta)))
    return pack_meta


def read_pack(pack_file: str) -> tuple[dict, dict]:
    """``(meta, arrays)`` of a pack file; a clear error for anything else."""
    if not os.path.isfile(pack_file):
        raise FileNotFoundError(f"no pack file {pack_file} (make one with `python -m "
                                "unclip_jax.train.embed_pack pack EMB_DIR OUT.npz`)")
    with np.load(pack_file, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    meta = json.loads(str(arrays.pop("meta"))) if "meta" in arrays else {}
    if meta.get("format") != PACK_FORMAT:
        raise ValueError(f"{pack_file} is not an embeddings pack (format "
                         f"{meta.get('format')!r}, want {PACK_FORMAT!r})")
    if meta.get("format_version", 0) > PACK_VERSION:
        raise ValueError(f"{pack_file}: pack format {meta['format_version']} is newer than this "
                         f"unclip_jax reads ({PACK_VERSION}); upgrade unclip_jax")
    return meta, arrays


def _unpacked_batches(clip_cfg, clip_params, arrays: dict, batch_size: int,
                      progress: bool) -> Iterator[dict]:
    import jax
    import jax.numpy as jnp
    from tqdm.auto import tqdm

    from unclip_jax.train.export import clip_encoder

    encode = clip_encoder(clip_cfg)
    images, index = arrays["images"], arrays["image_index"]
    n = len(index)
    for s in tqdm(range(0, n, batch_size), desc="unpack", unit="batch", disable=not progress):
        sl = slice(s, min(n, s + batch_size))
        img = images[index[sl]]
        ids = arrays["input_ids"][sl].astype(np.int32)
        mask = arrays["text_mask"][sl].astype(np.int32)
        pad = batch_size - len(img)  # one compiled shape: pad the last batch, then cut
        f = (lambda x: np.concatenate([x, np.repeat(x[-1:], pad, 0)])) if pad else (lambda x: x)
        img_emb, txt_emb, states = jax.device_get(encode(
            clip_params, jnp.asarray(f(img), jnp.float32) / 127.5 - 1.0, jnp.asarray(f(ids)),
            jnp.asarray(f(mask))))
        k = len(img)
        yield {"image": img, "caption": arrays["caption"][sl], "input_ids": ids,
               "image_emb": img_emb[:k], "text_emb": txt_emb[:k], "text_states": states[:k],
               "text_mask": mask}


def unpack(pack_file: str, clip_cfg, clip_params, out_dir: str, *, batch_size: int = 256,
           progress: bool = True, clip_name: Optional[str] = None) -> dict:
    """Re-encode a pack with ``(clip_cfg, clip_params)`` into the embeddings dir ``out_dir``."""
    from unclip_jax.data.embeddings import write_embeddings

    meta, arrays = read_pack(pack_file)
    length = clip_cfg.text_config.max_position_embeddings
    if arrays["input_ids"].shape[1] != length:
        raise ValueError(f"{pack_file}: captions have {arrays['input_ids'].shape[1]} tokens but "
                         f"this CLIP takes {length}; unpack with the CLIP that made the pack "
                         f"({meta['source_meta'].get('clip')!r})")
    new_meta = {k: v for k, v in meta["source_meta"].items()
                if k not in ("num_examples", "num_shards", "num_processes", "arrays", "format",
                             "format_version")}
    new_meta.update(unpacked_from=os.path.basename(pack_file))
    if clip_name:
        new_meta["clip"] = clip_name
    return write_embeddings(out_dir, _unpacked_batches(clip_cfg, clip_params, arrays,
                                                       batch_size, progress), meta=new_meta)


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m unclip_jax.train.embed_pack",
                                 description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pack", help="embeddings dir -> small pack file")
    p.add_argument("emb_dir")
    p.add_argument("out_file")
    u = sub.add_parser("unpack", help="pack file -> embeddings dir (re-encodes with CLIP)")
    u.add_argument("pack_file")
    u.add_argument("--model", required=True, help="model dir whose CLIP made the pack")
    u.add_argument("--out", required=True)
    u.add_argument("--batch-size", type=int, default=256)
    u.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    if args.cmd == "pack":
        m = pack(args.emb_dir, args.out_file)
        print(f"packed {m['num_examples']} examples ({m['num_images']} distinct images) into "
              f"{args.out_file} ({os.path.getsize(args.out_file) / 2**20:.1f} MiB)",
              file=sys.stderr)
        return 0
    from unclip_jax.train.export import load_clip_params

    ccfg, params, _ = load_clip_params(None, model=args.model)
    m = unpack(args.pack_file, ccfg, params, args.out, batch_size=args.batch_size,
               progress=not args.no_progress, clip_name=args.model)
    print(f"wrote {m['num_examples']} examples to {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
