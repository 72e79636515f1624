"""CLIP's byte-pair-encoding (BPE) tokenizer: a prompt -> the 77 token ids SD-1.x's text encoder reads.

Papers: Radford et al., "Learning Transferable Visual Models From Natural Language Supervision" (CLIP, 2021);
Sennrich et al., "Neural Machine Translation of Rare Words with Subword Units" (BPE, 2016).
Reference implementations (read for facts; this file is written from scratch, in the teaching style of
karpathy/minGPT mingpt/bpe.py):
  - openai/CLIP clip/simple_tokenizer.py (the original tokenizer and vocabulary),
  - huggingface/transformers 4.x src/transformers/models/clip/tokenization_clip.py, the *slow* CLIPTokenizer
    (use_fast=False) that Stable Diffusion 1.x pipelines and the official Diff-Plugin code use. minidiff gives
    the same ids as that tokenizer with ftfy installed; tests/test_tokenizer.py checks it on 2000 prompts.

Vocabulary: minidiff/bpe_simple_vocab_16e6.txt.gz, shipped as package data, is a byte-for-byte copy of
mlfoundations/open_clip src/open_clip/bpe_simple_vocab_16e6.txt.gz (MIT licence, Copyright (c) 2012-2021
Gabriel Ilharco et al.), itself OpenAI's CLIP vocabulary (MIT licence, Copyright (c) 2021 OpenAI). It holds
the ordered list of merges "a b" that BPE learned; the token ids follow from that order (see __init__).

The pipeline, for one prompt:
  1. Split out literal "<|startoftext|>" / "<|endoftext|>" strings: they map straight to their ids.
  2. Clean each remaining piece: ftfy.fix_text (mojibake, html entities, curly quotes, full-width letters,
     ...), collapse runs of whitespace to one space, strip, lower-case.
  3. Cut the piece into "words" with a regex: runs of letters, single digits, runs of other symbols, and
     English contractions ('s 't 're 've 'm 'll 'd).
  4. Write each word's UTF-8 bytes as printable unicode characters (bytes_to_unicode), mark the last character
     with "</w>" (end of word), then apply the learned merges, lowest rank first, until none applies.
  5. Look the sub-words up in the vocabulary; add start/end ids; truncate; pad with the end id to 77.
"""
import gzip
from pathlib import Path

import ftfy
import regex
import torch

VOCAB_PATH = Path(__file__).with_name("bpe_simple_vocab_16e6.txt.gz")
CONTEXT_LENGTH = 77  # SD-1.x text encoder: 77 positions = start + 75 content tokens + end
NUM_MERGES = 49152 - 256 - 2  # CLIP uses the first 48894 merges of the file: 49408 ids in all (see __init__)
BOS, EOS = "<|startoftext|>", "<|endoftext|>"  # ids 49406 and 49407; EOS also pads and stands for unknowns

# Step 1: the special strings, split out of the raw text exactly (case-sensitive), as transformers does.
SPECIAL_SPLIT = regex.compile(r"(<\|startoftext\|>|<\|endoftext\|>)")
# Step 3: words. \p{L} = any letter of any script, \p{N} = any digit (one digit per word, so numbers are
# tokenized digit by digit). The special strings come first so that a lower-cased "<|ENDOFTEXT|>" that
# survived step 1 still becomes one word (and then its special id, as in transformers).
WORD_PATTERN = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE)
# Step 2: whitespace, with the `regex` module's \s (Unicode White_Space) as in transformers. Python's `re`
# would also count the separators \x1c-\x1f as whitespace (ftfy usually deletes them first, not always).
WHITESPACE = regex.compile(r"\s+")


def bytes_to_unicode():
    """A reversible map from the 256 byte values to 256 printable unicode characters.

    BPE runs on strings, and we want it to handle any text without an "unknown" token, so it runs on the UTF-8
    *bytes* of the text. But some bytes are unprintable (control characters) or whitespace, which would be
    confusing in the merges file (it separates the two halves of a merge by a space). So the 188 bytes that
    already print nicely ('!'..'~', '¡'..'¬', '®'..'ÿ') map to themselves, and the other 68 (space, controls,
    ...) are shifted to the characters 256, 257, ... in order. For example the space byte 32 becomes 'Ġ'.
    """
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    byte_values = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            byte_values.append(b)
            chars.append(256 + n)  # the next unused code point above the byte range
            n += 1
    # Dictionary order matters: it is the order of the first 256 ids of the vocabulary.
    return {b: chr(c) for b, c in zip(byte_values, chars)}


def whitespace_clean(text):
    """Collapse every run of whitespace to one space and strip both ends."""
    return WHITESPACE.sub(" ", text).strip()


def read_merges(path=VOCAB_PATH):
    """The first NUM_MERGES merges of a CLIP vocabulary file (gzip or plain), as (left, right) pairs."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    # Line 0 is a "#version" header; every following line is one merge "left right", best (earliest) first.
    return [tuple(line.split()) for line in lines[1:NUM_MERGES + 1]]


class CLIPTokenizer:
    """CLIP BPE tokenizer. `tok(texts) -> LongTensor [B, 77]`; `tok.encode(text) -> ids` (no start/end ids).

    The vocabulary file is read when the tokenizer is built (about 0.2 s), never at import.
    """

    def __init__(self, vocab_path=VOCAB_PATH, context_length=CONTEXT_LENGTH):
        merges = read_merges(vocab_path)
        if len(merges) != NUM_MERGES or any(len(m) != 2 for m in merges):
            raise ValueError(f"{vocab_path}: not a CLIP BPE vocabulary "
                             f"({len(merges)} merges, want {NUM_MERGES})")
        self.context_length = context_length
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        # The vocabulary, in id order: the 256 single byte-characters, the same 256 marked as a word's end
        # ("a</w>"), then one token per merge (the two halves glued together), then the two special tokens.
        # 256 + 256 + 48894 + 2 = 49408 ids.
        single = list(self.byte_encoder.values())
        vocab = single + [c + "</w>" for c in single] + ["".join(m) for m in merges] + [BOS, EOS]
        self.encoder = {token: i for i, token in enumerate(vocab)}
        self.decoder = {i: token for token, i in self.encoder.items()}
        # rank of each merge: the lower, the earlier BPE learned it, the sooner it is applied
        self.bpe_ranks = {pair: rank for rank, pair in enumerate(merges)}
        self.bos_id, self.eos_id = self.encoder[BOS], self.encoder[EOS]
        self.pad_id = self.eos_id  # SD-1.x pads with the end token
        self.cache = {}  # word -> its sub-words; prompts repeat words a lot

    def bpe(self, word):
        """Split one byte-encoded word into sub-word tokens by applying the learned merges.

        Example: "cats" starts as ['c', 'a', 't', 's</w>']. Among the adjacent pairs ('c','a'), ('a','t'),
        ('t','s</w>') we take the one BPE learned first (lowest rank), glue every occurrence of it, and repeat
        until no adjacent pair is a known merge: ['c', 'at', 's</w>'] -> ['c', 'ats</w>'] -> ['cats</w>'],
        one token (id 3989).
        """
        if word in self.cache:
            return self.cache[word]
        # Individual characters; "</w>" marks the end of the word, so "at" inside "cat" and "at</w>" (the
        # word "at") are different tokens.
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:
            # the adjacent pair with the lowest rank (unknown pairs rank last)
            pairs = set(zip(parts, parts[1:]))
            best = min(pairs, key=lambda pair: self.bpe_ranks.get(pair, float("inf")))
            if best not in self.bpe_ranks:
                break  # no pair left that BPE knows how to merge
            first, second = best
            # Merge every occurrence of the pair, scanning left to right (so "a a a" -> "aa a").
            merged = []
            i = 0
            while i < len(parts):
                if i + 1 < len(parts) and parts[i] == first and parts[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        if len(self.cache) > 100_000:  # bound the memory of a long-running process
            self.cache.clear()
        self.cache[word] = parts
        return parts

    def _encode_piece(self, text):
        """Ids of a piece of text that holds no literal special string (steps 2-5 of the module docstring)."""
        text = whitespace_clean(ftfy.fix_text(text)).lower()
        ids = []
        for word in WORD_PATTERN.findall(text):
            if word in (BOS, EOS):  # e.g. "<|EndOfText|>", lower-cased by the cleanup: still the special id
                ids.append(self.encoder[word])
                continue
            # UTF-8 bytes -> printable characters, e.g. "é" = bytes c3 a9 -> "Ã©"
            chars = "".join(self.byte_encoder[b] for b in word.encode("utf-8"))
            # every BPE result is in the vocabulary; EOS stands for an unknown token, as in transformers
            ids.extend(self.encoder.get(token, self.eos_id) for token in self.bpe(chars))
        return ids

    def encode(self, text):
        """Token ids of `text`, without the start/end ids and without truncation."""
        if not isinstance(text, str):
            raise TypeError(f"CLIPTokenizer.encode takes a str, not {type(text).__name__}")
        ids = []
        # A capturing group makes split() keep the separators: "a<|endoftext|>b" -> "a", "<|endoftext|>", "b"
        for piece in SPECIAL_SPLIT.split(text):
            if piece in (BOS, EOS):
                ids.append(self.encoder[piece])
            elif piece:
                ids.extend(self._encode_piece(piece))
        return ids

    def __call__(self, texts):
        """LongTensor [B, context_length]: start id, up to context_length-2 ids of each text, end id, padding.

        A text longer than that is cut at the end, and the end id is still placed after the kept tokens
        (the text encoder pools its output at the first end id).
        """
        if isinstance(texts, str):
            texts = [texts]
        if not isinstance(texts, (list, tuple)) or not all(isinstance(t, str) for t in texts):
            raise TypeError("CLIPTokenizer takes a str or a list of str")
        out = torch.full((len(texts), self.context_length), self.pad_id, dtype=torch.long)  # [B, 77]
        for row, text in enumerate(texts):
            ids = [self.bos_id] + self.encode(text)[:self.context_length - 2] + [self.eos_id]
            out[row, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out

    def decode(self, ids):
        """Text of a list of ids (for inspection): sub-words glued, "</w>" turned back into spaces."""
        text = "".join(self.decoder[int(i)] for i in ids)
        data = bytes(self.byte_decoder[c] for c in text)  # the special tokens are plain ASCII: they survive
        return data.decode("utf-8", errors="replace").replace("</w>", " ").strip()
