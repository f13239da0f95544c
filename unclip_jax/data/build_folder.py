"""Build a tfds dataset from your own folder of images + captions, and print its ``--data`` spec.

    python -m unclip_jax.data.build_folder my_images --data-dir data --image-size 64
    # -> --data tfds:image_caption_folder/64:train@data
    unclip train all --config experiments/tiny.py --workdir runs/mine \\
        --data tfds:image_caption_folder/64:train@data

The folder layout and caption formats (CSV, JSONL, sidecar ``.txt``) are those of
:class:`unclip_jax.data.image_caption.ImageCaptionFolder`; bad images and rows are skipped and
counted (the counts are logged at the end of the build).
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from unclip_jax.data.image_caption import ImageCaptionConfig, ImageCaptionFolder

DATASET = "image_caption_folder"
DEFAULT_IMAGE_SIZE = 64


def build(folder: str, data_dir: str, image_size: int = DEFAULT_IMAGE_SIZE,
          name: Optional[str] = None, captions_file: Optional[str] = None) -> str:
    """Build the dataset of ``folder`` under ``data_dir`` (config ``name``, default the image
    size); returns the ``--data`` spec for ``unclip train`` / ``unclip embed``."""
    name = name or str(image_size)
    builder = ImageCaptionFolder(folder=folder, data_dir=data_dir,
                                 config=ImageCaptionConfig(name=name, image_size=image_size,
                                                           captions_file=captions_file))
    builder.download_and_prepare()
    return f"tfds:{DATASET}/{name}:train@{data_dir}"


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m unclip_jax.data.build_folder",
        description="Build a tfds dataset (array_record) from a folder of images + captions "
                    "(captions.csv / metadata.csv, captions.jsonl / metadata.jsonl, or sidecar "
                    ".txt files) and print the --data spec to train on it.")
    ap.add_argument("folder", help="the images (sub-folders allowed) and their captions")
    ap.add_argument("--data-dir", required=True, help="where tfds writes the dataset")
    ap.add_argument("--image-size", type=int, default=DEFAULT_IMAGE_SIZE,
                    help="side of the square images")
    ap.add_argument("--name", default=None,
                    help="dataset config name (default: the image size); use a new name for "
                         "another folder or size: an existing dataset of that name is reused")
    ap.add_argument("--captions-file", default=None,
                    help="CSV / JSONL caption file (relative to the folder) instead of the "
                         "auto-detected one")
    args = ap.parse_args(argv)
    spec = build(args.folder, args.data_dir, args.image_size, args.name, args.captions_file)
    print(f"--data {spec}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
