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
import json
import os
import string
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
        if context_length is None:
            context_length = self.context_length
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


def canonicalize_text(text: str) -> str:
    """big_vision's (and open_clip's) SigLIP cleaning: underscores to spaces, ASCII punctuation removed, lower case,
    whitespace runs collapsed."""
    text = text.replace("_", " ").translate(_NO_PUNCT).lower()
    return " ".join(text.split()).strip()


_NO_PUNCT = str.maketrans("", "", string.punctuation)
_CLEAN = {"canonicalize": lambda t: canonicalize_text(basic_clean(t)),
          "lower": lambda t: whitespace_clean(basic_clean(t)).lower(),
          "whitespace": lambda t: whitespace_clean(basic_clean(t))}


def _special_token(value) -> Optional[str]:
    """A special token of a ``tokenizer_config.json``: a string or ``{"content": ...}`` (an AddedToken)."""
    return value.get("content") if isinstance(value, dict) else value


class HFTokenizer:
    """open_clip's ``HFTokenizer`` (SigLIP's SentencePiece vocabularies, BERT's WordPiece, ...) on a local
    Hugging Face ``tokenizer.json``, run with the ``tokenizers`` package; the ids equal open_clip's (which runs
    ``transformers.AutoTokenizer`` on the same files).

    Each text is cleaned (``clean``: "whitespace" (default), "lower" or "canonicalize", as open_clip), encoded with
    the file's normalizer, pre-tokenizer, model and post-processor (its special tokens, e.g. SigLIP's ``</s>``),
    truncated to ``context_length`` tokens (special tokens included) and right-padded with the pad token to
    ``context_length``. ``strip_sep_token`` replaces the separator token by 0 (open_clip's option for BERT).

    The pad and separator tokens are those of a ``tokenizer_config.json`` beside the file (as transformers reads
    them), else the file's own padding settings; ``pad_token=`` overrides. A tokenizer without a pad token is
    refused (transformers refuses to pad without one too).
    """

    def __init__(self, tokenizer_file: Union[str, os.PathLike], context_length: Optional[int] = DEFAULT_CONTEXT_LENGTH,
                 clean: str = "whitespace", strip_sep_token: bool = False, *, pad_token: Optional[str] = None):
        try:
            from tokenizers import Tokenizer as _Tokenizer
        except ImportError:
            raise ImportError("Hugging Face tokenizer files need the tokenizers package: pip install tokenizers") \
                from None
        path = os.fspath(tokenizer_file)
        if path.endswith(".model"):
            raise ValueError(f"{path!r} is a raw SentencePiece model, which does not say which special tokens to add "
                             f"or how to pad: pass the tokenizer.json of its Hugging Face tokenizer (the "
                             f"hf_tokenizer_name of the model's config), e.g. as written by a transformers fast "
                             f"tokenizer's save_pretrained")
        if os.path.isdir(path):
            path = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"tokenizer file not found: {path!r} (tokenizer_file= must be a local "
                                    f"tokenizer.json or the folder holding it; fastclip downloads nothing)")
        if clean not in _CLEAN:
            raise ValueError(f"clean must be one of {sorted(_CLEAN)}, got {clean!r}")
        self.tokenizer = _Tokenizer.from_file(path)
        self.tokenizer.no_padding()
        self.tokenizer.no_truncation()
        self.context_length, self.clean, self.clean_fn = context_length, clean, _CLEAN[clean]
        self.strip_sep_token = strip_sep_token
        config = {}
        config_path = os.path.join(os.path.dirname(path), "tokenizer_config.json")
        if os.path.isfile(config_path):
            with open(config_path, encoding="utf-8") as f:
                config = json.load(f)
        with open(path, encoding="utf-8") as f:
            padding = json.load(f).get("padding") or {}
        pad_token = pad_token or _special_token(config.get("pad_token")) or padding.get("pad_token")
        if pad_token is None or self.tokenizer.token_to_id(pad_token) is None:
            raise ValueError(f"{path!r} has no pad token (none in a tokenizer_config.json beside it nor in its "
                             f"padding settings, or {pad_token!r} is not in its vocabulary): pass pad_token=")
        self.pad_token_id = self.tokenizer.token_to_id(pad_token)
        sep = _special_token(config.get("sep_token"))
        self.sep_token_id = self.tokenizer.token_to_id(sep) if sep is not None else None
        if strip_sep_token and self.sep_token_id is None:
            raise ValueError(f"strip_sep_token=True but {path!r} has no sep_token in a tokenizer_config.json")

    def __call__(self, texts: Union[str, Sequence[str]], context_length: Optional[int] = None) -> torch.Tensor:
        """(N, context_length) int64 ids."""
        if isinstance(texts, str):
            texts = [texts]
        context_length = context_length or self.context_length
        if not context_length or context_length < 1:
            raise ValueError(f"context_length must be >= 1, got {context_length}")
        self.tokenizer.enable_truncation(max_length=context_length)
        try:
            encodings = self.tokenizer.encode_batch([self.clean_fn(t) for t in texts])
        finally:
            self.tokenizer.no_truncation()
        longest = max((len(enc.ids) for enc in encodings), default=0)
        if longest > context_length:  # truncation cannot remove the special tokens (transformers fails here too)
            raise ValueError(f"context_length {context_length} is shorter than this tokenizer's special tokens "
                             f"({longest} ids for a text truncated as far as possible)")
        out = np.full((len(texts), context_length), self.pad_token_id, dtype=np.int64)
        for row, enc in enumerate(encodings):
            out[row, :len(enc.ids)] = enc.ids
        ids = torch.from_numpy(out)
        if self.strip_sep_token:
            ids = torch.where(ids == self.sep_token_id, torch.zeros_like(ids), ids)
        return ids


_DEFAULT: Optional[Tokenizer] = None


def _default() -> Tokenizer:
    global _DEFAULT
    if _DEFAULT is None:
        _DEFAULT = Tokenizer()
    return _DEFAULT


def get_tokenizer(model_name: str = "", context_length: Optional[int] = None, *,
                  tokenizer_file: Optional[Union[str, os.PathLike]] = None, **kwargs):
    """The tokenizer of an open_clip model name (or JSON config path), as open_clip's ``get_tokenizer``.

    Models with OpenAI's vocabulary (and no name) get the BPE :class:`Tokenizer` (shared, built on first use: it
    reads the 1.3 MB merges file). Models whose config names a Hugging Face tokenizer (``hf_tokenizer_name``:
    SigLIP's, BERT's for CLIPA) get an :class:`HFTokenizer` on ``tokenizer_file`` (the ``tokenizer.json`` of that
    tokenizer, or its folder: fastclip downloads nothing), with the config's ``tokenizer_kwargs`` (e.g.
    ``clean="canonicalize"``) updated by ``kwargs``. ``context_length`` defaults to the config's.
    """
    text_cfg = {}
    if model_name:
        from fastclip.models.configs import get_model_config

        text_cfg = get_model_config(model_name)["text_cfg"]
    context_length = context_length or text_cfg.get("context_length", DEFAULT_CONTEXT_LENGTH)
    hf_name = text_cfg.get("hf_tokenizer_name")
    if hf_name is None and tokenizer_file is None:
        if kwargs:
            raise TypeError(f"OpenAI's BPE tokenizer takes no options, got {sorted(kwargs)}")
        return _default() if context_length == DEFAULT_CONTEXT_LENGTH else Tokenizer(context_length=context_length)
    if tokenizer_file is None:
        raise ValueError(f"model {model_name!r} uses the Hugging Face tokenizer {hf_name!r}; fastclip downloads "
                         f"nothing: pass tokenizer_file= (the path of its tokenizer.json, or the folder holding it)")
    return HFTokenizer(tokenizer_file, context_length, **{**(text_cfg.get("tokenizer_kwargs") or {}), **kwargs})


def tokenize(texts: Union[str, Sequence[str]], context_length: int = DEFAULT_CONTEXT_LENGTH) -> torch.Tensor:
    """Token ids of ``texts`` as OpenAI's CLIP tokenizer gives them: (N, context_length) int64 (N = 1 for a str).

    Equal to ``open_clip.tokenize(texts, context_length)`` for any input. Row i is
    ``[49406, ids(texts[i])..., 49407, 0, ...]``; a text too long keeps its first ``context_length - 1`` tokens and
    ends in 49407.
    """
    return _default()(texts, context_length)


def decode(ids: Sequence[int]) -> str:
    return _default().decode(ids)


__all__ = ["Tokenizer", "HFTokenizer", "tokenize", "decode", "get_tokenizer", "canonicalize_text",
           "DEFAULT_CONTEXT_LENGTH"]
