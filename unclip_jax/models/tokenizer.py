"""CLIP tokenizer: ``transformers.CLIPTokenizer`` (the slow, exact one) from files we ship.

``unclip_jax/assets/clip_tokenizer/`` holds OpenAI CLIP's 49,408-token BPE (made by
``unclip_jax/convert/make_clip_vocab.py``); nothing is downloaded. A small vocabulary learned from
captions (``build_small_vocab``) loads and tokenizes through the same functions.

``tokenize(texts) -> (ids [B, 77] int32, mask [B, 77] int32)`` pads as OpenAI CLIP and open_clip
do: ``bos``, BPE tokens, ``eos``, then id 0 (``"!"``); a prompt longer than the context is cut to
``max_length - 1`` tokens followed by ``eos``, with a ``PromptTruncatedWarning``. Text is cleaned
like OpenAI / open_clip (ftfy, double HTML unescape, whitespace collapse, lower case) before the
tokenizer sees it, so HTML entities come out as open_clip tokenizes them.
"""
from __future__ import annotations

import functools
import html
import os
import warnings
from typing import NamedTuple, Optional, Sequence, Union

import numpy as np

from unclip_jax.convert.make_clip_vocab import BOS, EOS, PAD, PAD_ID, build_small_vocab  # noqa: F401

DEFAULT_TOKENIZER_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                     "assets", "clip_tokenizer")
CONTEXT_LENGTH = 77


class PromptTruncatedWarning(UserWarning):
    """A prompt had more tokens than the context length and was cut."""


class TokenizedBatch(NamedTuple):
    ids: np.ndarray  # [B, L] int32
    mask: np.ndarray  # [B, L] int32, 1 for bos / tokens / eos
    lengths: np.ndarray  # [B] int32, untruncated token counts including bos / eos
    truncated: np.ndarray  # [B] bool


@functools.lru_cache(maxsize=8)
def _load_cached(path: str, model_max_length: int):
    from transformers import CLIPTokenizer

    # from_pretrained on the folder, not the constructor: transformers 4.x gives the slow
    # (exact) tokenizer; 5.x (tokenizers backend only) still loads; our pre-cleaning in
    # ``encode`` removes the HTML-entity differences of the fast one.
    return CLIPTokenizer.from_pretrained(
        path,
        local_files_only=True,
        errors="replace",
        unk_token=EOS,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        model_max_length=model_max_length,
    )


def load_tokenizer(path: Optional[str] = None, model_max_length: int = CONTEXT_LENGTH):
    """The slow ``transformers.CLIPTokenizer`` for the files in ``path`` (default: the shipped
    OpenAI CLIP vocabulary), with ``model_max_length`` set (never HF's 1e30 default). Its own
    ``pad_token`` is ``<|endoftext|>`` (a "!" pad token would swallow every "!" in prompts);
    ``tokenize`` pads with id 0 as OpenAI does. Cached per (path, length); do not mutate it."""
    path = os.path.abspath(path or DEFAULT_TOKENIZER_DIR)
    for name in ("vocab.json", "merges.txt"):
        if not os.path.exists(os.path.join(path, name)):
            raise FileNotFoundError(f"{name} missing in {path} (see unclip_jax/convert/make_clip_vocab.py)")
    return _load_cached(path, int(model_max_length))


def basic_clean(text: str) -> str:
    """ftfy + double HTML unescape + strip (OpenAI / open_clip's ``basic_clean``)."""
    import ftfy

    return html.unescape(html.unescape(ftfy.fix_text(text))).strip()


def encode(text: str, tokenizer=None) -> list[int]:
    """Token ids of one prompt with ``bos`` / ``eos``, untruncated."""
    tok = tokenizer if tokenizer is not None else load_tokenizer()
    ids = tok.convert_tokens_to_ids(tok.tokenize(basic_clean(text)))
    return [tok.bos_token_id, *ids, tok.eos_token_id]


def tokenize_with_info(texts: Union[str, Sequence[str]], max_length: int = CONTEXT_LENGTH,
                       tokenizer=None) -> TokenizedBatch:
    """Like ``tokenize`` but also returns untruncated lengths and a per-prompt truncation flag;
    never warns."""
    tok = tokenizer if tokenizer is not None else load_tokenizer()
    if isinstance(texts, str):
        texts = [texts]
    if max_length < 2:
        raise ValueError("max_length must leave room for bos and eos")
    ids = np.full((len(texts), max_length), PAD_ID, np.int32)
    mask = np.zeros((len(texts), max_length), np.int32)
    lengths = np.zeros((len(texts),), np.int32)
    for i, text in enumerate(texts):
        row = encode(text, tok)
        lengths[i] = len(row)
        if len(row) > max_length:
            row = row[:max_length - 1] + [tok.eos_token_id]
        ids[i, :len(row)] = row
        mask[i, :len(row)] = 1
    return TokenizedBatch(ids, mask, lengths, lengths > max_length)


def tokenize(texts: Union[str, Sequence[str]], max_length: int = CONTEXT_LENGTH, tokenizer=None,
             warn: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Prompts -> ``(ids [B, max_length] int32, mask [B, max_length] int32)`` as OpenAI CLIP pads
    them (mask is 1 on bos, tokens and eos). Warns ``PromptTruncatedWarning`` naming the prompts
    that did not fit (see ``tokenize_with_info`` for the flags)."""
    out = tokenize_with_info(texts, max_length, tokenizer)
    if warn and out.truncated.any():
        which = [int(i) for i in np.nonzero(out.truncated)[0]]
        warnings.warn(
            f"{len(which)} prompt(s) longer than {max_length} tokens were truncated (indices "
            f"{which[:10]}{'...' if len(which) > 10 else ''}; token counts "
            f"{[int(out.lengths[i]) for i in which[:10]]})", PromptTruncatedWarning, stacklevel=2)
    return out.ids, out.mask


def decode(ids: Sequence[int], tokenizer=None) -> str:
    """Ids -> text, dropping bos / eos / padding."""
    tok = tokenizer if tokenizer is not None else load_tokenizer()
    ids = [int(i) for i in ids]
    if tok.eos_token_id in ids:
        ids = ids[:ids.index(tok.eos_token_id)]
    ids = [i for i in ids if i != tok.bos_token_id]
    return tok.decode(ids, skip_special_tokens=True).strip()


__all__ = ["load_tokenizer", "tokenize", "tokenize_with_info", "encode", "decode", "basic_clean",
           "build_small_vocab", "PromptTruncatedWarning", "TokenizedBatch",
           "DEFAULT_TOKENIZER_DIR", "CONTEXT_LENGTH"]
