"""Tests for minidiff/models/tokenizer.py, the CLIP BPE tokenizer.

Fast tests: ids of committed strings (written out literally below; they came from transformers' slow
CLIPTokenizer), start/end ids, end id kept on truncation, padding, the byte map.
Parity test (@pytest.mark.parity, needs transformers 4.x and open_clip_torch's vocabulary file): transformers'
*slow* CLIPTokenizer, built offline from open_clip's independent copy of the vocabulary, against minidiff
on 2,000 deterministically generated prompts (unicode, emoji, accents, curly quotes, full-width text,
html entities, odd whitespace, numbers, CJK, control characters, special-token strings, prompts far past 77
tokens).

    python -m pytest tests/test_tokenizer.py -q
"""
import gzip
import importlib.util
import json
import os
import random
from pathlib import Path

import pytest
import torch

from minidiff.models.tokenizer import CONTEXT_LENGTH, CLIPTokenizer, bytes_to_unicode

BOS_ID, EOS_ID = 49406, 49407

# (text, ids without start/end): ids from transformers 4.57.6 CLIPTokenizer(use_fast=False), ftfy 6.3
COMMITTED = [
    ("a photo of a cat", [320, 1125, 539, 320, 2368]),
    ("please remove the rain and the haze", [1474, 9709, 518, 2443, 537, 518, 22785]),
    ("  Café   “crème brûlée”\t😀 ", [15304, 257, 1075, 12138, 614, 711, 127, 119, 75, 13489, 257, 7334]),
    ("ＦＵＬＬ width 2024 &amp; it’s", [1476, 23571, 273, 271, 273, 275, 261, 585, 568]),
    ("a<|endoftext|>b <|STARTOFTEXT|>", [320, 49407, 321, 49406]),
    ("猫 и 日本", [163, 234, 360, 140, 372, 39121, 19277, 361]),
    ("", []),
]


@pytest.fixture(scope="module")
def tok():
    return CLIPTokenizer()


@pytest.mark.parametrize("text,ids", COMMITTED)
def test_committed_strings(tok, text, ids):
    assert tok.encode(text) == ids
    row = tok(text)[0].tolist()
    assert row[:len(ids) + 2] == [BOS_ID] + ids + [EOS_ID]


def test_batch_shape_and_padding(tok):
    out = tok(["a photo of a cat", ""])
    assert out.shape == (2, CONTEXT_LENGTH) and out.dtype == torch.long
    assert out[0, :7].tolist() == [BOS_ID, 320, 1125, 539, 320, 2368, EOS_ID]
    assert (out[0, 7:] == EOS_ID).all()  # padded with the end id
    assert out[1, 0] == BOS_ID and (out[1, 1:] == EOS_ID).all()
    assert torch.equal(tok("a photo of a cat"), out[:1])  # a str is a batch of one


def test_truncation_keeps_end_token(tok):
    ids = tok(" ".join(["cat"] * 200))[0].tolist()
    assert len(ids) == CONTEXT_LENGTH
    assert ids[0] == BOS_ID and ids[-1] == EOS_ID
    assert ids[1:-1] == [2368] * (CONTEXT_LENGTH - 2)  # 75 content tokens, cut at the end
    assert len(tok.encode(" ".join(["cat"] * 200))) == 200  # encode() itself does not truncate


def test_bad_input(tok):
    with pytest.raises(TypeError):
        tok(3)
    with pytest.raises(TypeError):
        tok.encode(["a"])


def test_byte_map_and_decode(tok):
    m = bytes_to_unicode()
    assert sorted(m) == list(range(256)) and len(set(m.values())) == 256
    assert m[ord(" ")] == "Ġ" and m[ord("a")] == "a"
    assert tok.decode(tok.encode("a photo of a cat!")) == "a photo of a cat !"


# ----------------------------------------------------------------------------------------------------------
# Parity with transformers' slow CLIPTokenizer

def _open_clip_vocab_file():
    """open_clip's copy of the vocabulary, found without importing open_clip (it needs torchvision)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("open_clip_torch is not installed (its vocabulary file is the independent copy)")
    path = Path(list(spec.submodule_search_locations)[0]) / "bpe_simple_vocab_16e6.txt.gz"
    if not path.is_file():
        pytest.skip(f"{path} is missing")
    return path


def _reference_tokenizer(tmp_path):
    """transformers' slow CLIPTokenizer from vocab.json + merges.txt laid out as Hugging Face's files."""
    tfclip = pytest.importorskip("transformers.models.clip.tokenization_clip")
    with gzip.open(_open_clip_vocab_file(), "rt", encoding="utf-8") as f:
        merges = f.read().split("\n")[1:49152 - 256 - 2 + 1]
    chars = list(tfclip.bytes_to_unicode().values())  # transformers' own byte map, not minidiff's
    vocab = chars + [c + "</w>" for c in chars] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (tmp_path / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}), encoding="utf-8")
    (tmp_path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    ref = tfclip.CLIPTokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"))
    assert ref.fix_text is not None, "ftfy must be installed: without it transformers uses another cleanup"
    return ref


PIECES = {
    "words": "a photo of the cat dog Mountain sunset portrait oil painting by Greg, detailed 8k".split(),
    "accents": ["café", "naïve", "Zürich", "São Paulo", "crème brûlée", "ÉCOLE", "Øresund",
                "e\u0301", "ñandú"],
    "quotes": ["“quoted”", "‘single’", "it’s", "we’re", "I'LL", "don't", "«guillemets»", "„low“", "'d", "''"],
    "emoji": ["😀", "👍🏽", "👨‍👩‍👧", "🇫🇷", "❤️", "🔥🔥", "✨", "🤖:", "☕"],
    "fullwidth": ["ＡＢＣ", "ｈｅｌｌｏ", "１２３", "！？", "ｶﾀｶﾅ", "　"],
    "html": ["&amp;", "&lt;b&gt;", "&quot;x&quot;", "&#39;", "&nbsp;", "&eacute;", "&#x1F600;",
             "&copy;", "<b>"],
    "space": ["\t", "\n", "\r\n", "\u00a0", "\u2003", "\u3000", "\u200b", "\x1c", "\u2028", "   ", "\x0b"],
    "numbers": ["3.14", "1,000,000", "2024-01-01", "50%", "-7", "1e-5", "٣", "½", "Ⅻ", "²", "0x1F"],
    "cjk": ["猫", "日本語の写真", "한국어", "ひらがな", "中文提示词", "漢字かな交じり", "𠀀"],
    "scripts": ["Привет", "Ελληνικά", "مرحبا", "שלום", "नमस्ते", "สวัสดี", "Ǆ", "ß", "İstanbul", "ﬁne"],
    "symbols": ["!!!", "...", "--", "(masterpiece:1.2)", "[x]", "@user", "#tag", "http://a.b/c?d=1",
                "~", "→", "∑"],
    "mojibake": ["cafÃ©", "â€œquotedâ€\x9d", "Ã¼ber", "ðŸ˜€"],
    "special": ["<|startoftext|>", "<|endoftext|>", "<|ENDOFTEXT|>", "&lt;|endoftext|&gt;", "<|endoftext",
                "x<|endoftext|>y", "<|startoftext|><|endoftext|>", "< |endoftext| >"],
    "control": ["\x00", "\x07", "\x1b[31mred\x1b[0m", "\ufffd", "\x7f", "\u202e", "\ufeff"],
}
SEPARATORS = [" ", " ", " ", "", ", ", "\t", "  \n ", "\u3000", "-", "_", "/"]


def _prompts(n=2000, seed=0):
    """Deterministic varied prompts: random mixes of the pieces above; every 10th one far past 77 tokens."""
    rng = random.Random(seed)
    kinds = sorted(PIECES)
    prompts = ["", " ", "\n\t", "a", "A", "Cat", "cat " * 80] + [p for k in kinds for p in PIECES[k]]
    while len(prompts) < n:
        count = rng.randint(40, 120) if len(prompts) % 10 == 0 else rng.randint(1, 12)
        parts = []
        for _ in range(count):
            kind = rng.choice(kinds + ["words"] * 4)
            part = rng.choice(PIECES[kind])
            parts.append(part.upper() if rng.random() < 0.1 else part)
            parts.append(rng.choice(SEPARATORS))
        prompts.append("".join(parts[:-1]))
    return prompts


@pytest.mark.parity
def test_parity_with_transformers_slow_tokenizer(tok, tmp_path):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here needs the network; make sure of it
    ref = _reference_tokenizer(tmp_path)
    prompts = _prompts()
    # what SD-1.x pipelines call: pad to 77 with the end id, truncate keeping start and end
    expected = ref(prompts, padding="max_length", max_length=CONTEXT_LENGTH, truncation=True)["input_ids"]
    actual = tok(prompts).tolist()
    bad = [i for i in range(len(prompts)) if actual[i] != expected[i]]
    # untruncated ids too, so a difference past token 75 cannot hide
    bad_full = [i for i, p in enumerate(prompts) if tok.encode(p) != ref.encode(p, add_special_tokens=False)]
    n_long = sum(len(ref.encode(p, add_special_tokens=False)) > CONTEXT_LENGTH - 2 for p in prompts)
    print(f"[tokenizer parity] {len(prompts)} prompts ({n_long} longer than 75 tokens): "
          f"{len(bad)} differ at 77, {len(bad_full)} differ untruncated")
    assert n_long >= 100
    assert not bad and not bad_full, f"first differing prompt: {prompts[(bad or bad_full)[0]]!r}"
