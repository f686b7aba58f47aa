"""The tokenizer's piece cache when it fills: eviction must keep the special tokens and the ids unchanged.

The cache is bounded (``fastclip.tokenizer._MAX_CACHE`` distinct pieces, cleared when full). Shrunk to a few
entries here, so a test reaches eviction many times over; the ids must stay open_clip's, and the literal strings
``<start_of_text>``/``<end_of_text>`` in a text must still map to their single ids after every reset.
"""
import pytest
import torch

import fastclip.tokenizer as tk

open_clip = pytest.importorskip("open_clip")

TEXTS = ["a photo of a cat", "<start_of_text> hello <end_of_text> world", "the quick brown fox jumps over dogs",
         "naïve café déjà vu 123 <end_of_text>", "<end_of_text>", "dogs cats birds fish horses"]


@pytest.mark.parametrize("cache_size", [1, 3, 8])
def test_eviction_keeps_specials_and_ids(monkeypatch, cache_size):
    monkeypatch.setattr(tk, "_MAX_CACHE", cache_size + 2)  # the two specials + cache_size pieces
    tok = tk.Tokenizer()
    for _ in range(3):  # every pass refills and evicts
        for text in TEXTS:
            assert torch.equal(tok([text]), open_clip.tokenize([text])), text
            assert len(tok._cache) <= tk._MAX_CACHE
            assert tok._cache[tk.SOT_TOKEN] == (tok.sot_token_id,)
            assert tok._cache[tk.EOT_TOKEN] == (tok.eot_token_id,)
    assert tok.encode("<end_of_text>") == [tok.eot_token_id]


def test_cache_is_bounded_by_the_limit(monkeypatch):
    monkeypatch.setattr(tk, "_MAX_CACHE", 5)
    tok = tk.Tokenizer()
    sizes = []
    for word in ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"]:
        tok.encode(word)
        sizes.append(len(tok._cache))
    assert max(sizes) == 5 and min(sizes[3:]) < 5, sizes  # it fills to the limit, then resets to the specials


def test_context_length_bounds():
    tok = tk.Tokenizer()
    ids = tok(["a b c d e f g"], context_length=4)
    assert ids.tolist() == open_clip.tokenize(["a b c d e f g"], context_length=4).tolist()
    assert tok(["a"], context_length=3).tolist() == [[tok.sot_token_id, 320, tok.eot_token_id]]
    assert tok(["a"], context_length=1).tolist() == [[tok.eot_token_id]]
    with pytest.raises(ValueError, match="context_length"):
        tok(["a"], context_length=-1)
    assert tok("a photo").shape == (1, 77)
    assert tk.Tokenizer(context_length=9)("a photo").shape == (1, 9)


def test_context_length_zero_is_refused():
    with pytest.raises(ValueError, match="context_length"):
        tk.Tokenizer()(["a"], context_length=0)


def test_decode_of_a_fresh_tokenizer_equals_open_clip():
    """decode on a new instance (not the shared default), text and byte tokens that are not UTF-8 on their own."""
    from open_clip.tokenizer import SimpleTokenizer

    tok, ref = tk.Tokenizer(), SimpleTokenizer()
    ids = tok.encode("naïve café 東京 <end_of_text> a photo")
    assert ids == ref.encode("naïve café 東京 <end_of_text> a photo")
    assert tok.decode(ids) == ref.decode(ids)
    lone = [tok.encoder[tok.byte_encoder[b]] for b in (0xE6, 0x9D, 0xFF)]  # a cut multi-byte char, a stray byte
    assert tok.decode(lone) == ref.decode(lone) and "\ufffd" in tok.decode(lone)
