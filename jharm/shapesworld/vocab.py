"""A small CLIP BPE vocabulary covering every ShapesWorld caption word.

The 49408-token CLIP vocabulary would make the tiny text encoder's embedding
table larger than the rest of the model, so the tiny CLIP uses its own HF-style
vocabulary: the 512 byte symbols (with and without ``</w>``), one merge chain
per caption word (so common words become one token), BOS and EOS. It loads
with the project's ``CLIPTokenizer`` like any ``vocab.json`` + ``merges.txt``.
"""
from __future__ import annotations

import regex

from jharm.shapesworld.captions import vocabulary
from jharm.tokenizer import _SPLIT, BOS, EOS, CLIPTokenizer, bytes_to_unicode

MAX_LENGTH = 32  # longest caption: 28 tokens with BOS/EOS (some words take a few tokens)


def _pieces(words) -> list[str]:
    """Byte-encoded pre-tokenization pieces of the words (CLIP splits on punctuation)."""
    byte_encoder = bytes_to_unicode()
    split = regex.compile(_SPLIT, regex.IGNORECASE)
    pieces = []
    for word in words:
        for piece in split.findall(word.lower()):
            encoded = "".join(byte_encoder[b] for b in piece.encode("utf-8"))
            if encoded not in pieces:
                pieces.append(encoded)
    return pieces


def build_vocab(words=None) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(encoder, merges) whose merges compose each word left to right.

    A piece whose merge chain is interrupted by another word's earlier merge
    still tokenizes (into a few in-vocabulary tokens): every merge result is
    in the vocabulary.
    """
    words = vocabulary() if words is None else words
    symbols = list(bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols]
    merges, seen = [], set(vocab)
    for piece in _pieces(words):
        chars = list(piece[:-1]) + [piece[-1] + "</w>"]
        left = chars[0]
        for right in chars[1:]:
            merged = left + right
            if merged not in seen:
                merges.append((left, right))
                vocab.append(merged)
                seen.add(merged)
            left = merged
    vocab += [BOS, EOS]
    return {token: i for i, token in enumerate(vocab)}, merges


def shapesworld_tokenizer(max_length: int = MAX_LENGTH) -> CLIPTokenizer:
    """The tiny-CLIP tokenizer (EOS padding, transformers' text cleaning)."""
    encoder, merges = build_vocab()
    return CLIPTokenizer(encoder, merges, pad_token_id=encoder[EOS], clean="hf", max_length=max_length,
                         source="shapesworld vocabulary")
