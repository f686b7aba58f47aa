"""OpenAI's CLIP tokenizer: byte-level BPE over 49,408 tokens, giving the ids of ``open_clip.tokenize``.

Text -> ``ftfy.fix_text`` -> HTML entities unescaped twice -> whitespace runs collapsed -> lower case -> split by
OpenAI's regular expression (the literal strings ``<start_of_text>``/``<end_of_text>``, English contractions,
letter runs, single digits, runs of other non-space characters) -> each piece's UTF-8 bytes mapped to printable
characters -> BPE merges in rank order -> ids. Each row is ``[49406] + ids + [49407]`` zero-padded to the context
length, or truncated to it with the last id replaced by end-of-text (49407).

Faster than open_clip's: each distinct piece's ids are cached (open_clip caches the merged string and re-splits and
looks it up every time), and rows are written into one numpy array instead of one tensor per row.
The merges file ``fastclip/data/bpe_simple_vocab_16e6.txt.gz`` is OpenAI's (MIT; the licence sits beside it).
"""
from __future__ import annotations

import gzip
import html
import os
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

DEFAULT_CONTEXT_LENGTH = 77
SOT_TOKEN, EOT_TOKEN = "<start_of_text>", "<end_of_text>"
_PATTERN = r"""<start_of_text>|<end_of_text>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
_MAX_CACHE = 1 << 20  # distinct pieces kept; the cache is cleared when full


def default_bpe_path() -> str:
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "bpe_simple_vocab_16e6.txt.gz")


def bytes_to_unicode() -> Dict[int, str]:
    """OpenAI's reversible map from the 256 byte values to printable characters (printable Latin-1 bytes map to
    themselves; the others to U+0100 onwards), so BPE works on strings without whitespace or control characters."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def basic_clean(text: str) -> str:
    import ftfy

    text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text))
    return text.strip()


def whitespace_clean(text: str) -> str:
    return " ".join(text.split())


class Tokenizer:
    """``Tokenizer()(texts, context_length=77)`` -> (N, context_length) int64, equal to ``open_clip.tokenize``."""

    def __init__(self, bpe_path: Optional[str] = None, context_length: int = DEFAULT_CONTEXT_LENGTH):
        import regex

        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {v: k for k, v in self.byte_encoder.items()}
        with gzip.open(bpe_path or default_bpe_path()) as f:
            lines = f.read().decode("utf-8").split("\n")
        # line 0 is a version header; OpenAI uses the first 49152 - 256 - 2 merges
        merges = [tuple(line.split()) for line in lines[1:49152 - 256 - 2 + 1]]
        chars = list(self.byte_encoder.values())
        vocab = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + [SOT_TOKEN, EOT_TOKEN]
        self.encoder: Dict[str, int] = {tok: i for i, tok in enumerate(vocab)}
        self.decoder: Dict[int, str] = {i: tok for tok, i in self.encoder.items()}
        self.bpe_ranks: Dict[Tuple[str, str], int] = {m: i for i, m in enumerate(merges)}
        self.vocab_size = len(self.encoder)
        self.sot_token_id, self.eot_token_id = self.encoder[SOT_TOKEN], self.encoder[EOT_TOKEN]
        self.context_length = context_length
        self.pat = regex.compile(_PATTERN, regex.IGNORECASE)
        self._specials = {SOT_TOKEN: (self.sot_token_id,), EOT_TOKEN: (self.eot_token_id,)}
        self._cache: Dict[str, Tuple[int, ...]] = dict(self._specials)

    def bpe(self, piece: str) -> List[str]:
        """BPE of one byte-encoded piece: repeatedly merge the adjacent pair of lowest rank, all its occurrences
        left to right, until no adjacent pair has a rank. The last symbol carries the end-of-word mark."""
        word = list(piece[:-1]) + [piece[-1] + "</w>"]
        ranks = self.bpe_ranks
        while len(word) > 1:
            best, best_rank = None, None
            for pair in zip(word, word[1:]):
                r = ranks.get(pair)
                if r is not None and (best_rank is None or r < best_rank):
                    best, best_rank = pair, r
            if best is None:
                break
            first, second = best
            merged, i, n = [], 0, len(word)
            while i < n:
                if i < n - 1 and word[i] == first and word[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        return word

    def _piece_ids(self, piece: str) -> Tuple[int, ...]:
        ids = self._cache.get(piece)
        if ids is None:
            encoded = "".join(self.byte_encoder[b] for b in piece.encode("utf-8"))
            ids = tuple(self.encoder[t] for t in self.bpe(encoded))
            if len(self._cache) >= _MAX_CACHE:
                self._cache = dict(self._specials)
            self._cache[piece] = ids
        return ids

    def encode(self, text: str) -> List[int]:
        """Ids of one text, without start/end of text."""
        text = whitespace_clean(basic_clean(text)).lower()
        ids: List[int] = []
        for piece in self.pat.findall(text):
            ids.extend(self._piece_ids(piece))
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """Text of the ids (end-of-word marks become spaces; padding zeros decode to "!", as OpenAI's)."""
        text = "".join(self.decoder[int(i)] for i in ids)
        return bytearray(self.byte_decoder[c] for c in text).decode("utf-8", errors="replace").replace("</w>", " ")

    def __call__(self, texts: Union[str, Sequence[str]], context_length: Optional[int] = None) -> torch.Tensor:
        if isinstance(texts, str):
            texts = [texts]
        context_length = context_length or self.context_length
        if context_length < 1:
            raise ValueError(f"context_length must be >= 1, got {context_length}")
        out = np.zeros((len(texts), context_length), dtype=np.int64)
        for row, text in enumerate(texts):
            ids = [self.sot_token_id] + self.encode(text) + [self.eot_token_id]
            if len(ids) > context_length:
                ids = ids[:context_length]
                ids[-1] = self.eot_token_id  # a truncated text still ends in end-of-text (the pooled position)
            out[row, :len(ids)] = ids
        return torch.from_numpy(out)


_DEFAULT: Optional[Tokenizer] = None


def get_tokenizer() -> Tokenizer:
    """The shared default tokenizer (built on first use: it reads the 1.3 MB merges file)."""
    global _DEFAULT
    if _DEFAULT is None:
        _DEFAULT = Tokenizer()
    return _DEFAULT


def tokenize(texts: Union[str, Sequence[str]], context_length: int = DEFAULT_CONTEXT_LENGTH) -> torch.Tensor:
    """Token ids of ``texts`` as OpenAI's CLIP tokenizer gives them: (N, context_length) int64 (N = 1 for a str).

    Equal to ``open_clip.tokenize(texts, context_length)`` for any input. Row i is
    ``[49406, ids(texts[i])..., 49407, 0, ...]``; a text too long keeps its first ``context_length - 1`` tokens and
    ends in 49407.
    """
    return get_tokenizer()(texts, context_length)


def decode(ids: Sequence[int]) -> str:
    return get_tokenizer().decode(ids)


__all__ = ["Tokenizer", "tokenize", "decode", "get_tokenizer", "DEFAULT_CONTEXT_LENGTH"]
