"""Local and remote (URL-style, e.g. ``gs://bucket/run``) paths: one test for which is which, and
``etils.epath`` for the ones written through it."""
from __future__ import annotations

import os
from typing import Any, Union

from etils import epath

PathLike = Union[str, os.PathLike, epath.Path]


def is_remote(path: Any) -> bool:
    """True for a URL-style path (``gs://``, ``s3://``, ...): written through ``etils.epath``,
    never as a local folder named ``gs:``."""
    return "://" in str(path)


def as_path(path: Any):
    """``etils.epath.Path`` of a str / ``os.PathLike``; any other object is taken as an
    ``epath.Path``-like already (``/``, ``mkdir``, ``exists``, ``open``, ``read_text``,
    ``write_text``)."""
    if isinstance(path, (str, os.PathLike)):
        return epath.Path(path)
    return path


__all__ = ["PathLike", "is_remote", "as_path"]
