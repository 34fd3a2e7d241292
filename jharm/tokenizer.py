"""CLIP's byte-level BPE tokenizer, offline.

Vocabulary from a local HF tokenizer folder (``vocab.json`` + ``merges.txt``,
e.g. an SD pipeline's ``tokenizer/``) or, by default, from the BPE merges file
``bpe_simple_vocab_16e6.txt.gz`` that the ``open_clip_torch`` package ships
(found on disk; ``open_clip`` is never imported). Both give the same 49408 ids.

Text cleaning follows the reference the vocabulary came from:

* ``"openclip"`` (OpenAI CLIP / open_clip): ftfy, HTML-unescape twice,
  collapse whitespace, lowercase;
* ``"hf"`` (transformers' CLIPTokenizer, what SD pipelines use): Unicode NFC,
  collapse whitespace, lowercase — no ftfy, no HTML unescaping.

The two agree on ordinary prompts; they differ on HTML entities ("&amp;") and
text that ftfy repairs (mojibake). Sequences are ``[BOS] + tokens + [EOS]``,
truncated to ``max_length`` keeping EOS last, padded with ``pad_token_id``:
EOS (49407) for SD 1.x's tokenizer, 0 ("!") for SD 2.x and open_clip.
"""
from __future__ import annotations

import functools
import gzip
import html
import importlib.util
import json
import os
import unicodedata
from typing import Mapping, Sequence

import numpy as np
import regex

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


@functools.lru_cache()
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable-unicode table."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, codes)))


def open_clip_bpe_path() -> str:
    """The BPE merges file shipped inside the installed ``open_clip_torch`` package."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the CLIP BPE vocabulary comes from the open_clip_torch package, which is not installed "
            "(pip install --no-deps open_clip_torch), or pass a local HF tokenizer folder")
    path = os.path.join(list(spec.submodule_search_locations)[0], "bpe_simple_vocab_16e6.txt.gz")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"CLIP BPE vocabulary missing: {path}")
    return path


def _clean_openclip(text: str) -> str:
    import ftfy

    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return " ".join(text.split()).lower()


def _clean_hf(text: str) -> str:
    return regex.sub(r"\s+", " ", unicodedata.normalize("NFC", text)).lower()


_CLEANERS = {"openclip": _clean_openclip, "hf": _clean_hf}


def byte_pair_encode(word: list[str], ranks: Mapping[tuple[str, str], int]) -> list[str]:
    """Apply merges to the symbols of one word: repeatedly the lowest-ranked adjacent pair, every
    occurrence of it at once (CLIP's and GPT-2's BPE)."""
    while len(word) > 1:
        ranked = [ranks[pair] for pair in zip(word, word[1:]) if pair in ranks]
        if not ranked:
            break
        best = min(ranked)
        first, second = next(pair for pair in zip(word, word[1:]) if ranks.get(pair) == best)
        merged, i = [], 0
        while i < len(word):
            if i < len(word) - 1 and word[i] == first and word[i + 1] == second:
                merged.append(first + second)
                i += 2
            else:
                merged.append(word[i])
                i += 1
        word = merged
    return word


class CLIPTokenizer:
    """Byte-level BPE with CLIP's vocabulary, padding and truncation conventions."""

    def __init__(self, encoder: dict[str, int], merges: Sequence[tuple[str, str]], *, pad_token_id: int,
                 clean: str = "openclip", max_length: int = 77, source: str = ""):
        if clean not in _CLEANERS:
            raise ValueError(f"unknown text cleaning {clean!r}; expected one of {sorted(_CLEANERS)}")
        for special in (BOS, EOS):
            if special not in encoder:
                raise ValueError(f"{source}: vocabulary has no {special} token")
        self.encoder = encoder
        self.decoder = {i: t for t, i in encoder.items()}
        self.bpe_ranks = {tuple(m): r for r, m in enumerate(merges)}
        self.bos_token_id, self.eos_token_id = encoder[BOS], encoder[EOS]
        self.pad_token_id = pad_token_id
        self.clean = clean
        self.max_length = max_length
        self.source = source
        self._byte_encoder = bytes_to_unicode()
        self._byte_decoder = {c: b for b, c in self._byte_encoder.items()}
        self._split = regex.compile(_SPLIT, regex.IGNORECASE)
        self._cache: dict[str, list[str]] = {}

    # ---- constructors -------------------------------------------------------------
    @classmethod
    def default(cls, pad: str = "eos", clean: str = "openclip", max_length: int = 77) -> "CLIPTokenizer":
        """The 49408-token CLIP vocabulary from open_clip_torch's BPE file.

        ``pad``: "eos" (SD 1.x / transformers' openai tokenizer) or "zero"
        (SD 2.x / open_clip).
        """
        return cls.from_bpe_file(open_clip_bpe_path(), pad=pad, clean=clean, max_length=max_length)

    @classmethod
    def from_bpe_file(cls, path: str, pad: str = "eos", clean: str = "openclip", max_length: int = 77):
        try:
            with gzip.open(path) if path.endswith(".gz") else open(path, "rb") as f:
                lines = f.read().decode("utf-8").split("\n")
        except OSError as err:
            raise ValueError(f"{path}: cannot read the BPE file: {err}") from None
        merges = [tuple(line.split()) for line in lines[1:49152 - 256 - 2 + 1]]
        symbols = list(bytes_to_unicode().values())
        vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [BOS, EOS]
        encoder = {token: i for i, token in enumerate(vocab)}
        pad_id = {"eos": encoder[EOS], "zero": 0}.get(pad)
        if pad_id is None:
            raise ValueError(f"pad must be 'eos' or 'zero', got {pad!r}")
        return cls(encoder, merges, pad_token_id=pad_id, clean=clean, max_length=max_length, source=path)

    @classmethod
    def from_pretrained(cls, folder: str, clean: str = "hf") -> "CLIPTokenizer":
        """A local HF tokenizer folder (vocab.json, merges.txt, optional configs)."""
        vocab_path, merges_path = os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt")
        for path in (vocab_path, merges_path):
            if not os.path.isfile(path):
                raise FileNotFoundError(f"tokenizer file not found: {path}")
        with open(vocab_path, encoding="utf-8") as f:
            encoder = json.load(f)
        with open(merges_path, encoding="utf-8") as f:
            lines = f.read().split("\n")
        if lines and lines[0].startswith("#version"):
            lines = lines[1:]
        merges = [tuple(line.split()) for line in lines if line.strip()]
        settings = {}
        for name in ("special_tokens_map.json", "tokenizer_config.json"):
            path = os.path.join(folder, name)
            if os.path.isfile(path):
                with open(path, encoding="utf-8") as f:
                    settings.update(json.load(f))
        pad = settings.get("pad_token", EOS)
        if isinstance(pad, dict):
            pad = pad.get("content", EOS)
        if pad not in encoder:
            raise ValueError(f"{folder}: pad token {pad!r} is not in vocab.json")
        max_length = int(settings.get("model_max_length", 77))
        max_length = max_length if max_length < 10_000 else 77  # HF's "unset" sentinel
        return cls(encoder, merges, pad_token_id=encoder[pad], clean=clean, max_length=max_length, source=folder)

    def save_pretrained(self, folder: str) -> None:
        """Write vocab.json, merges.txt and the special-token settings (an HF tokenizer folder)."""
        from jharm.weights.io import atomic_write_bytes, atomic_write_json

        os.makedirs(folder, exist_ok=True)
        atomic_write_json(os.path.join(folder, "vocab.json"), self.encoder)
        merges = sorted(self.bpe_ranks, key=self.bpe_ranks.get)
        atomic_write_bytes(os.path.join(folder, "merges.txt"),
                           ("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n").encode("utf-8"))
        atomic_write_json(os.path.join(folder, "special_tokens_map.json"), {
            "bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": self.decoder[self.pad_token_id]})
        atomic_write_json(os.path.join(folder, "tokenizer_config.json"), {
            "tokenizer_class": "CLIPTokenizer", "model_max_length": self.max_length,
            "bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": self.decoder[self.pad_token_id]})

    # ---- encoding ----------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return len(self.encoder)

    def _bpe(self, token: str) -> list[str]:
        if token not in self._cache:
            self._cache[token] = byte_pair_encode(list(token[:-1]) + [token[-1] + "</w>"], self.bpe_ranks)
        return self._cache[token]

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without BOS/EOS.

        In "hf" mode a literal ``<|startoftext|>``/``<|endoftext|>`` in the text is
        that special token, as in transformers (added tokens are split first).
        """
        if self.clean == "hf":
            ids = []
            for part in regex.split(r"(<\|startoftext\|>|<\|endoftext\|>)", text):
                ids.extend([self.encoder[part]] if part in (BOS, EOS) else self._encode_plain(part))
            return ids
        return self._encode_plain(text)

    def _encode_plain(self, text: str) -> list[int]:
        ids = []
        for piece in self._split.findall(_CLEANERS[self.clean](text)):
            symbols = "".join(self._byte_encoder[b] for b in piece.encode("utf-8"))
            for token in self._bpe(symbols):
                if token not in self.encoder:
                    raise ValueError(f"{self.source}: token {token!r} (from {piece!r}) is not in the vocabulary")
                ids.append(self.encoder[token])
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        special = {self.bos_token_id, self.eos_token_id}
        text = "".join(self.decoder[int(i)] for i in ids if int(i) not in special)
        return bytearray(self._byte_decoder[c] for c in text).decode("utf-8", errors="replace").replace("</w>", " ").strip()

    def __call__(self, texts: str | Sequence[str], max_length: int | None = None) -> np.ndarray:
        """(B, max_length) int32 ids: BOS, tokens, EOS, then padding."""
        if isinstance(texts, str):
            texts = [texts]
        length = max_length or self.max_length
        if length < 2:
            raise ValueError(f"max_length must be at least 2 (BOS + EOS), got {length}")
        out = np.full((len(texts), length), self.pad_token_id, np.int32)
        for row, text in enumerate(texts):
            ids = [self.bos_token_id] + self.encode(text)[: length - 2] + [self.eos_token_id]
            out[row, : len(ids)] = ids
        return out

    def eos_positions(self, ids: np.ndarray) -> np.ndarray:
        """Index of the first EOS in each row (where CLIP pools)."""
        ids = np.asarray(ids)
        return np.argmax(ids == self.eos_token_id, axis=-1)
