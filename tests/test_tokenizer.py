"""CLIP tokenizer: shipped vocab files, parity with open_clip's tokenizer, small vocabularies."""
import importlib.util
import json
import os
import sys
import warnings

import numpy as np
import pytest

from unclip_jax.convert import make_clip_vocab as mcv
from unclip_jax.models import tokenizer as tk

PROMPTS = [
    "a photo of a cat",
    "A Photo Of A CAT",
    "",
    "   lots   of\twhite\n space   ",
    "a red heart",
    "an armchair in the shape of an avocado",
    "Tom &amp; Jerry",
    "Tom &amp;amp; Jerry &lt;3 &quot;quoted&quot; &#39;single&#39; &#x263A;",
    "<b>bold</b> &nbsp; tags",
    "café naïve résumé façade Øresund",
    "東京の夜景, ネオン",
    "emoji 😀🎉❤️ 👩‍👩‍👧 and flags 🇯🇵",
    "Ελληνικά и русский текст",
    "العربية עברית",
    "don't won't it's we're they've I'm you'll he'd",
    "hello, world! ... ?!? ;-) :D (parentheses) [brackets] {braces}",
    "numbers 1234567890 3.14159 1,000,000 2nd 3rd",
    "snake_case-and-kebab-case camelCaseWords",
    "https://example.com/path?q=1&x=y#frag",
    "e-mail: someone@example.org",
    "ＦＵＬＬＷＩＤＴＨ letters",
    "broken mojibake: Ã©tÃ© â€œquotesâ€\x9d",
    "tabs\tand\r\nnewlines",
    "a painting of a fox sitting in a field at sunrise in the style of Claude Monet",
    "a corgi's head depicted as an explosion of a nebula, digital art, trending on artstation",
    " ".join(["word"] * 100),
    "an extremely long prompt " + "with many many different words and punctuation, " * 12,
    "x" * 300,
    "A   PHOTO of 🐶 #dog @home $100 50% off -- best-ever!!!",
    "supercalifragilisticexpialidocious antidisestablishmentarianism",
]


def _open_clip_tokenizer():
    """open_clip's own tokenizer.py, loaded by path (importing the open_clip package would pull
    torchvision / timm). Needs `pip install --no-deps open_clip_torch==3.3.0` (+ torch, ftfy, regex)."""
    try:
        spec = importlib.util.find_spec("open_clip")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        pytest.fail("open_clip_torch is not installed: run the README test command, or pip install --no-deps open_clip_torch==3.3.0")
    import torch
    path = os.path.join(list(spec.submodule_search_locations)[0], "tokenizer.py")
    mspec = importlib.util.spec_from_file_location("_open_clip_tokenizer", path)
    mod = importlib.util.module_from_spec(mspec)
    sys.modules.setdefault("_open_clip_tokenizer", mod)
    mspec.loader.exec_module(mod)
    return mod.SimpleTokenizer()


def test_shipped_vocab_size_and_known_ids():
    tok = tk.load_tokenizer()
    assert len(tok) == 49408 and tok.model_max_length == 77
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (49406, 49407, 49407)
    ids, mask = tk.tokenize(["a photo of a cat"])
    assert ids.dtype == np.int32 and ids.shape == (1, 77) and mask.shape == (1, 77)
    # OpenAI CLIP's ids for this prompt
    assert ids[0, :8].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407, 0]
    assert mask[0].sum() == 7 and (ids[0, 7:] == 0).all()
    assert tk.decode(ids[0]) == "a photo of a cat"


def test_from_pretrained_directory_offline():
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(tk.DEFAULT_TOKENIZER_DIR, local_files_only=True)
    assert tok.model_max_length == 77 and len(tok) == 49408
    assert tok("hi!")["input_ids"] == [49406, 1883, 256, 49407]  # "!" stays "!</w>"


def test_truncation_flag_and_warning():
    long = PROMPTS[-4]
    info = tk.tokenize_with_info(["short", long])
    assert info.truncated.tolist() == [False, True] and info.lengths[1] > 77
    assert info.ids[1, -1] == 49407 and info.mask[1].all()
    with pytest.warns(tk.PromptTruncatedWarning, match="indices \\[1\\]"):
        tk.tokenize(["short", long])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tk.tokenize(["short"])
        tk.tokenize([long], warn=False)


def test_matches_open_clip():
    ref_tok = _open_clip_tokenizer()
    ref = ref_tok(PROMPTS, context_length=77).numpy()
    ids, mask = tk.tokenize(PROMPTS, warn=False)
    for i, p in enumerate(PROMPTS):
        assert ids[i].tolist() == ref[i].tolist(), p
    # shorter contexts truncate the same way
    ids16, _ = tk.tokenize(PROMPTS, max_length=16, warn=False)
    assert (ids16 == ref_tok(PROMPTS, context_length=16).numpy()).all()


def test_special_token_strings_as_openai():
    # OpenAI's simple_tokenizer (and HF) read these strings as the special tokens; open_clip 3.x
    # renamed its specials to <start_of_text> / <end_of_text>, so it is not the reference here.
    ids = tk.encode("<|startoftext|> special <|endoftext|> tokens")
    assert ids[:2] == [49406, 49406] and ids[3] == 49407 and ids[-1] == 49407 and len(ids) == 6


def test_regenerated_vocab_equals_shipped(tmp_path):
    bpe = mcv.find_installed_bpe()
    if bpe is None:
        pytest.fail("open_clip_torch is not installed: run the README test command, or pip install --no-deps open_clip_torch==3.3.0")
    out = mcv.make_clip_tokenizer_files(str(tmp_path), bpe_path=bpe)
    for name in ("vocab.json", "merges.txt"):
        with open(os.path.join(out, name), "rb") as a, \
                open(os.path.join(tk.DEFAULT_TOKENIZER_DIR, name), "rb") as b:
            assert a.read() == b.read(), name
    ref = _open_clip_tokenizer()
    vocab = json.load(open(os.path.join(out, "vocab.json"), encoding="utf-8"))
    assert len(vocab) == 49408
    for t, i in list(vocab.items())[:-2]:
        assert ref.encoder[t] == i


CAPTIONS = ["a red heart", "a blue heart", "a green heart", "red apple", "green apple",
            "smiling face with heart eyes", "face with tears of joy", "thumbs up: medium skin tone",
            "the red car", "a red heart with sparkles", "heart eyes cat", "grinning cat face"] * 3


def test_small_vocab_roundtrip(tmp_path):
    vocab, merges = tk.build_small_vocab(CAPTIONS, str(tmp_path), vocab_size=600, min_frequency=2)
    assert len(vocab) == 514 + len(merges) <= 600
    assert vocab[mcv.EOS] == len(vocab) - 1 and vocab[mcv.BOS] == len(vocab) - 2
    tok = tk.load_tokenizer(str(tmp_path))
    assert len(tok) == len(vocab) and tok.model_max_length == 77
    ids, mask = tk.tokenize(["A red heart!", "unseen wörds ✨"], tokenizer=tok)
    assert ids.shape == (2, 77) and ids.max() < len(vocab)
    assert (ids.argmax(-1) == mask.sum(-1) - 1).all()  # eos is the highest id: argmax pooling works
    assert ids[0, 1:4].tolist() == [vocab["a</w>"], vocab["red</w>"], vocab["heart</w>"]]
    assert tk.decode(ids[0], tok) == "a red heart !"
    assert tk.decode(ids[1], tok) == "unseen wörds ✨"


def test_small_vocab_word_level(tmp_path):
    vocab, _ = tk.build_small_vocab(CAPTIONS, str(tmp_path), vocab_size=None, min_frequency=1)
    tok = tk.load_tokenizer(str(tmp_path))
    for cap in set(CAPTIONS):
        ids = tk.encode(cap, tok)[1:-1]
        assert len(ids) == len(tk.basic_clean(cap).replace(":", " :").split()), cap
