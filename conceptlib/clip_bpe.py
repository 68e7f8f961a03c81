"""A pure-Python CLIP BPE tokenizer that gives exactly keras-cv's ``SimpleTokenizer`` results.

Training only needs to turn prompts into token ids, and importing keras-cv's tokenizer imports
keras-cv and hence TensorFlow (seconds of start-up, for nothing). ``ClipTokenizer`` reads the
same vocabulary file and applies the same steps: HTML-unescape twice, collapse whitespace (no
ftfy, as keras-cv), lowercase, split with the same regular expression, map bytes to unicode,
apply the byte-level BPE merges, and wrap in start/end-of-text. The ids, ``encoder``,
``decoder`` and ``decode`` output are identical to keras-cv's (tested in
tests/test_clip_bpe.py).

The algorithm is OpenAI CLIP's ``simple_tokenizer.py`` (MIT licence,
https://github.com/openai/CLIP), as used by keras-cv
(keras_cv/src/models/stable_diffusion/clip_tokenizer.py). Imports only the standard library and
``regex`` (for ``\\p{L}``/``\\p{N}``); never keras.
"""

from __future__ import annotations

import functools
import gzip
import html
from pathlib import Path

import regex

START_OF_TEXT = "<|startoftext|>"
END_OF_TEXT = "<|endoftext|>"
# The first line of the merges file is a header; CLIP uses 49152 - 256 - 2 merges so that the
# vocabulary (256 bytes x 2 + merges + 2 specials) has 49408 entries.
NUM_MERGES = 49152 - 256 - 2
PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


@functools.lru_cache(maxsize=None)
def bytes_to_unicode() -> dict[int, str]:
    """Every byte mapped to a printable unicode character (printable ASCII and Latin-1 map to
    themselves; the rest to code points from 256 on), so BPE never sees whitespace or control
    characters."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(code) for code in codes)))


def get_pairs(word: tuple[str, ...]) -> set[tuple[str, str]]:
    """The adjacent symbol pairs of ``word``."""
    return set(zip(word, word[1:]))


def clean(text: str) -> str:
    """keras-cv's basic_clean + whitespace_clean + lowercase (HTML entities unescaped twice)."""
    text = html.unescape(html.unescape(text)).strip()
    return regex.sub(r"\s+", " ", text).strip().lower()


class ClipTokenizer:
    """CLIP's byte-level BPE tokenizer, read from ``bpe_simple_vocab_16e6.txt.gz``.

    Attributes match keras-cv's ``SimpleTokenizer``: ``encoder`` (token string -> id, 49408
    entries including ``<|startoftext|>`` and ``<|endoftext|>``), ``decoder`` (id -> string),
    ``byte_encoder``/``byte_decoder``, ``bpe_ranks``.
    """

    def __init__(self, bpe_path: str | Path):
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {v: k for k, v in self.byte_encoder.items()}
        with gzip.open(bpe_path) as handle:
            lines = handle.read().decode("utf-8").split("\n")
        merges = [tuple(line.split()) for line in lines[1 : NUM_MERGES + 1]]
        vocab = list(self.byte_encoder.values())
        vocab += [v + "</w>" for v in vocab]
        vocab += ["".join(merge) for merge in merges]
        vocab += [START_OF_TEXT, END_OF_TEXT]
        self.encoder = {token: index for index, token in enumerate(vocab)}
        self.decoder = {index: token for token, index in self.encoder.items()}
        self.bpe_ranks = {merge: rank for rank, merge in enumerate(merges)}
        self.cache = {START_OF_TEXT: START_OF_TEXT, END_OF_TEXT: END_OF_TEXT}
        self.pattern = regex.compile(
            regex.escape(START_OF_TEXT) + "|" + regex.escape(END_OF_TEXT) + "|" + PATTERN,
            regex.IGNORECASE,
        )

    @property
    def start_of_text(self) -> int:
        return self.encoder[START_OF_TEXT]

    @property
    def end_of_text(self) -> int:
        return self.encoder[END_OF_TEXT]

    def bpe(self, token: str) -> str:
        """The BPE pieces of one pre-token (already byte-mapped), space-separated, the last
        one ending in ``</w>``; cached."""
        if token in self.cache:
            return self.cache[token]
        word = tuple(token[:-1]) + (token[-1] + "</w>",)
        pairs = get_pairs(word)
        if not pairs:
            return token + "</w>"
        while True:
            bigram = min(pairs, key=lambda pair: self.bpe_ranks.get(pair, float("inf")))
            if bigram not in self.bpe_ranks:
                break
            first, second = bigram
            merged: list[str] = []
            i = 0
            while i < len(word):
                try:
                    j = word.index(first, i)
                except ValueError:
                    merged.extend(word[i:])
                    break
                merged.extend(word[i:j])
                i = j
                if i < len(word) - 1 and word[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(first)
                    i += 1
            word = tuple(merged)
            if len(word) == 1:
                break
            pairs = get_pairs(word)
        result = " ".join(word)
        self.cache[token] = result
        return result

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``: start-of-text, the BPE ids, end-of-text (no padding)."""
        ids = [self.start_of_text]
        for piece in self.pattern.findall(clean(text)):
            mapped = "".join(self.byte_encoder[b] for b in piece.encode("utf-8"))
            ids.extend(self.encoder[bpe_token] for bpe_token in self.bpe(mapped).split(" "))
        ids.append(self.end_of_text)
        return ids

    def decode(self, ids) -> str:
        """The text of ``ids`` (``</w>`` becomes a space; invalid UTF-8 is replaced)."""
        text = "".join(self.decoder[int(i)] for i in ids)
        data = bytearray(self.byte_decoder[c] for c in text)
        return data.decode("utf-8", errors="replace").replace("</w>", " ")
