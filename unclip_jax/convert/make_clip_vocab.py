"""Make the ``vocab.json`` / ``merges.txt`` files that ``transformers.CLIPTokenizer`` reads.

Two sources:

* ``make_clip_tokenizer_files``: OpenAI CLIP's 49,408-token BPE, built from the merges list
  ``bpe_simple_vocab_16e6.txt.gz`` (shipped inside the open-clip-torch wheel; OpenAI's ``clip``
  package has the same file). The vocabulary is laid out as OpenAI's ``simple_tokenizer`` does:
  the 256 byte symbols (``bytes_to_unicode`` order), the same symbols + ``</w>``, one token per
  merge (the first 49152 - 256 - 2 merges), then ``<|startoftext|>`` and ``<|endoftext|>``.
  ``unclip_jax/assets/clip_tokenizer/`` holds its output::

      pip download --no-deps open_clip_torch==3.3.0 -d /tmp/oc
      python -m unclip_jax.convert.make_clip_vocab --wheel /tmp/oc/open_clip_torch-3.3.0-py3-none-any.whl

* ``build_small_vocab``: a small byte-level BPE learned from captions (for tiny models such as the
  emoji CLIP), same layout and same pre-tokenisation / cleaning as CLIP, so the same
  ``CLIPTokenizer`` and ``unclip_jax.models.tokenizer.tokenize`` work on it. With enough merges
  and ``min_frequency=1`` every caption word becomes one token (a word-level vocabulary).

Both write ``tokenizer_config.json`` / ``special_tokens_map.json`` too (``model_max_length=77``,
``pad_token`` = ``<|endoftext|>``), so ``CLIPTokenizer.from_pretrained(dir)`` works offline.
"""
from __future__ import annotations

import argparse
import collections
import gzip
import heapq
import html
import io
import json
import os
import zipfile
from functools import lru_cache
from typing import Iterable, Optional, Sequence

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
# Padding. OpenAI CLIP pads with id 0 ("!"), which ``tokenize`` does; but a HF tokenizer whose
# pad_token is "!" treats every "!" in a prompt as that special token (id 0 instead of "!</w>"),
# so the HF files name <|endoftext|> as pad_token, as openai/clip-vit-* on the HF hub do.
PAD = EOS
PAD_ID = 0
MERGES_HEADER = "#version: 0.2"
NUM_CLIP_MERGES = 49152 - 256 - 2  # 48894: what OpenAI's tokenizer keeps of the merges file
CLIP_VOCAB_SIZE = 49408
BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
DEFAULT_OUT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                           "assets", "clip_tokenizer")

# CLIP's pre-tokenisation (OpenAI simple_tokenizer / HF CLIPTokenizer), case-insensitive.
PRETOKENIZE_PATTERN = (r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|"
                       r"[\p{N}]|[^\s\p{L}\p{N}]+")


@lru_cache()
def bytes_to_unicode() -> dict[int, str]:
    """Byte value -> printable unicode char (GPT-2 / CLIP byte-level BPE alphabet).

    Printable latin-1 bytes map to themselves; the other 68 bytes (controls, space, ...) map to
    ``chr(256 + n)`` in increasing byte order. The dict is ordered like CLIP's vocabulary start:
    the printable bytes first, then the remapped ones."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
            *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def base_alphabet() -> list[str]:
    """The first 512 CLIP tokens: byte symbols, then byte symbols + ``</w>``."""
    syms = list(bytes_to_unicode().values())
    return syms + [s + "</w>" for s in syms]


def read_bpe_merges(path: str, num_merges: int = NUM_CLIP_MERGES) -> list[tuple[str, str]]:
    """Merges from a ``bpe_simple_vocab_16e6.txt.gz`` (or plain text) file: skip the header line,
    keep the next ``num_merges`` lines, as OpenAI's tokenizer does."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        return _parse_merges(f.read(), num_merges)


def _parse_merges(data: bytes, num_merges: int) -> list[tuple[str, str]]:
    lines = data.decode("utf-8").split("\n")[1:num_merges + 1]
    merges = [tuple(line.split()) for line in lines]
    bad = [m for m in merges if len(m) != 2]
    if bad:
        raise ValueError(f"malformed merge lines: {bad[:5]}")
    return merges  # type: ignore[return-value]


def read_bpe_merges_from_wheel(wheel: str, num_merges: int = NUM_CLIP_MERGES):
    """The merges inside an open-clip-torch wheel (``open_clip/bpe_simple_vocab_16e6.txt.gz``)."""
    with zipfile.ZipFile(wheel) as z:
        name = next((n for n in z.namelist() if n.endswith("/" + BPE_FILE)), None)
        if name is None:
            raise FileNotFoundError(f"{BPE_FILE} not in {wheel}")
        return _parse_merges(gzip.decompress(z.read(name)), num_merges)


def find_installed_bpe() -> Optional[str]:
    """Path of ``bpe_simple_vocab_16e6.txt.gz`` in an installed ``open_clip`` (or OpenAI
    ``clip``) package, located without importing it (its ``__init__`` needs torchvision)."""
    import importlib.util

    for pkg in ("open_clip", "clip"):
        try:
            spec = importlib.util.find_spec(pkg)
        except (ImportError, ValueError):
            spec = None
        for loc in (spec.submodule_search_locations or []) if spec else []:
            path = os.path.join(loc, BPE_FILE)
            if os.path.exists(path):
                return path
    return None


def vocab_from_merges(merges: Sequence[tuple[str, str]], specials=(BOS, EOS)) -> dict[str, int]:
    """CLIP vocabulary layout: 512 byte symbols, one token per merge, then the special tokens."""
    tokens = base_alphabet() + ["".join(m) for m in merges] + list(specials)
    vocab = {}
    for t in tokens:
        if t in vocab:
            raise ValueError(f"duplicate token {t!r} in vocabulary")
        vocab[t] = len(vocab)
    return vocab


def write_tokenizer_files(out_dir: str, vocab: dict[str, int], merges: Sequence[tuple[str, str]],
                          model_max_length: int = 77) -> str:
    """Write ``vocab.json``, ``merges.txt``, ``tokenizer_config.json``, ``special_tokens_map.json``."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False, separators=(",", ":"))
        f.write("\n")
    with open(os.path.join(out_dir, "merges.txt"), "w", encoding="utf-8") as f:
        f.write(MERGES_HEADER + "\n")
        for a, b in merges:
            f.write(f"{a} {b}\n")
    specials = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": PAD}
    with open(os.path.join(out_dir, "special_tokens_map.json"), "w") as f:
        json.dump(specials, f, indent=2)
        f.write("\n")
    config = dict(specials, tokenizer_class="CLIPTokenizer", model_max_length=model_max_length,
                  errors="replace", clean_up_tokenization_spaces=False)
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2)
        f.write("\n")
    return out_dir


def make_clip_tokenizer_files(out_dir: str = DEFAULT_OUT, bpe_path: Optional[str] = None,
                              wheel: Optional[str] = None) -> str:
    """Write OpenAI CLIP's tokenizer files (49,408 tokens) from the merges file or a wheel."""
    if wheel:
        merges = read_bpe_merges_from_wheel(wheel)
    else:
        bpe_path = bpe_path or find_installed_bpe()
        if bpe_path is None:
            raise FileNotFoundError(
                f"no {BPE_FILE}: pass --bpe or --wheel (pip download --no-deps open_clip_torch)")
        merges = read_bpe_merges(bpe_path)
    vocab = vocab_from_merges(merges)
    if len(vocab) != CLIP_VOCAB_SIZE:
        raise ValueError(f"expected {CLIP_VOCAB_SIZE} tokens, got {len(vocab)}")
    return write_tokenizer_files(out_dir, vocab, merges)


# ------------------------------------------------------------------------------------------
# small vocabularies learned from captions
# ------------------------------------------------------------------------------------------
def clean_text(text: str) -> str:
    """CLIP's text cleaning: ftfy, double HTML unescape, whitespace collapse, lower case."""
    import ftfy

    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return " ".join(text.split()).lower()


def caption_words(captions: Iterable[str]) -> collections.Counter:
    """Counter of CLIP pre-tokens (byte-encoded symbol tuples ending in ``</w>``)."""
    import regex

    pat = regex.compile(PRETOKENIZE_PATTERN, regex.IGNORECASE)
    enc = bytes_to_unicode()
    counts: collections.Counter = collections.Counter()
    for cap in captions:
        for tok in pat.findall(clean_text(cap)):
            if tok in (BOS, EOS):
                continue
            syms = "".join(enc[b] for b in tok.encode("utf-8"))
            counts[tuple(syms[:-1]) + (syms[-1] + "</w>",)] += 1
    return counts


def learn_bpe(word_counts: dict[tuple[str, ...], int], num_merges: int,
              min_frequency: int = 2) -> list[tuple[str, str]]:
    """Greedy BPE: repeatedly merge the most frequent adjacent pair (ties: smallest pair), up to
    ``num_merges`` merges or until no pair occurs ``min_frequency`` times."""
    words = [list(w) for w in word_counts]
    freqs = list(word_counts.values())
    counts: collections.Counter = collections.Counter()
    where: dict[tuple[str, str], set] = collections.defaultdict(set)
    for i, (w, n) in enumerate(zip(words, freqs)):
        for p in zip(w, w[1:]):
            counts[p] += n
            where[p].add(i)
    heap = [(-n, p) for p, n in counts.items()]
    heapq.heapify(heap)
    merges: list[tuple[str, str]] = []
    while len(merges) < num_merges and heap:
        neg, pair = heapq.heappop(heap)
        if counts.get(pair, 0) != -neg:  # stale entry
            continue
        if -neg < min_frequency:
            break
        merges.append(pair)
        a, b = pair
        touched = set()
        for i in list(where.pop(pair, ())):
            w, n = words[i], freqs[i]
            for p in zip(w, w[1:]):
                counts[p] -= n
                touched.add(p)
            out, j = [], 0
            while j < len(w):
                if j + 1 < len(w) and w[j] == a and w[j + 1] == b:
                    out.append(a + b)
                    j += 2
                else:
                    out.append(w[j])
                    j += 1
            words[i] = out
            for p in zip(out, out[1:]):
                counts[p] += n
                where[p].add(i)
                touched.add(p)
        counts.pop(pair, None)
        for p in touched:
            if p == pair:
                continue
            if counts.get(p, 0) > 0:
                heapq.heappush(heap, (-counts[p], p))
            else:
                counts.pop(p, None)
    return merges


def build_small_vocab(captions: Iterable[str], out_dir: Optional[str] = None,
                      vocab_size: Optional[int] = 1024, min_frequency: int = 2,
                      model_max_length: int = 77):
    """Learn a small CLIP-style byte-level BPE vocabulary from ``captions``.

    ``vocab_size`` counts everything: 512 byte symbols + merges + 2 special tokens (``None``: merge
    until no pair reaches ``min_frequency``). The EOT token has the highest id, so OpenAI-style
    argmax pooling works. Writes the tokenizer files to ``out_dir`` when given.
    Returns ``(vocab, merges)``.
    """
    base = len(base_alphabet()) + 2
    if vocab_size is not None and vocab_size < base:
        raise ValueError(f"vocab_size must be >= {base} (byte alphabet + 2 special tokens)")
    num_merges = (vocab_size - base) if vocab_size is not None else 10 ** 9
    merges = learn_bpe(caption_words(captions), num_merges, min_frequency)
    # a merge whose result already is a token (possible in principle) would duplicate it
    seen, unique = set(base_alphabet()), []
    for m in merges:
        if "".join(m) not in seen:
            seen.add("".join(m))
            unique.append(m)
    vocab = vocab_from_merges(unique)
    if out_dir is not None:
        write_tokenizer_files(out_dir, vocab, unique, model_max_length)
    return vocab, unique


def main(argv: Optional[Sequence[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=DEFAULT_OUT, help="output folder (default: the package assets)")
    ap.add_argument("--bpe", help=f"path of {BPE_FILE}")
    ap.add_argument("--wheel", help="path of an open_clip_torch wheel holding it")
    ap.add_argument("--captions", help="build a small vocab instead, from this text file (one "
                                       "caption per line)")
    ap.add_argument("--vocab-size", type=int, default=1024)
    ap.add_argument("--min-frequency", type=int, default=2)
    args = ap.parse_args(argv)
    if args.captions:
        with io.open(args.captions, encoding="utf-8") as f:
            caps = [line.rstrip("\n") for line in f if line.strip()]
        vocab, merges = build_small_vocab(caps, args.out, args.vocab_size, args.min_frequency)
        print(f"wrote {len(vocab)} tokens ({len(merges)} merges) to {args.out}")
    else:
        out = make_clip_tokenizer_files(args.out, args.bpe, args.wheel)
        print(f"wrote {CLIP_VOCAB_SIZE} tokens to {out}")


if __name__ == "__main__":
    main()
