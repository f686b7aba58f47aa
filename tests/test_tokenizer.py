"""fastclip.tokenize against open_clip.tokenize: identical ids on a hard corpus and on random Unicode."""
from __future__ import annotations

import gzip
import os
import random
import time

import pytest
import torch

open_clip = pytest.importorskip("open_clip")

import fastclip  # noqa: E402
from fastclip.models import get_model_config  # noqa: E402
from fastclip.tokenizer import Tokenizer, decode, default_bpe_path, tokenize  # noqa: E402

HARD = [
    "", " ", "   \t\n  ", "a", "A photo of a CAT.", "a photo of a cat", "Hello, World!!! 123 4567 3.14159",
    "<start_of_text>", "<end_of_text>", "<start_of_text> a <end_of_text> b", "<START_OF_TEXT>x<End_Of_Text>",
    "<start_of_text><end_of_text><start_of_text>", "<|endoftext|>", "<start_of_text", "start_of_text>",
    "naïve café résumé Ünïcödé façade", "Ελληνικά Русский עברית العربية हिन्दी ไทย",
    "日本語のテキスト、中文文本。한국어 텍스트", "漢字" * 60,
    "emoji 😀👍🏽🇫🇷 👨‍👩‍👧 ❤️ 🤖🔥", "🙂" * 100,
    "&amp; &amp;amp; &amp;amp;amp; &lt;b&gt;bold&lt;/b&gt; &#39;quoted&#39; &quot;x&quot; &nbsp;&copy;&#x263A;",
    "<b>html tags</b> <a href='x'>link</a> &amp;",
    "mojibake: Ã©tÃ© â€œquotesâ€\x9d Ã¼ber", "The Mona Lisa doesnÃ¢â‚¬â„¢t have eyebrows.",
    "x" * 1000, " ".join(["word"] * 300), "supercalifragilisticexpialidocious " * 20,
    "tabs\tand\nnewlines\r\n  and   runs\u00a0of\u2003spaces\u3000here", "zero\u200bwidth\u200djoiner\ufeffbom",
    "don't it's we're I'LL they've she'd you'RE", "'s 't 're", "\x00\x01\x1b[31mred\x1b[0m\x7f",
    "ﬁ ﬂ ligatures ＦＵＬＬＷＩＤＴＨ １２３", "curly “quotes” and ‘apostrophes’ — dashes – …",
    "1234567890" * 10, "a1b2c3 4.5e-6 -7 +8 100%", "#hashtag @user https://example.com/path?q=1&r=2",
    "$$$ ((())) [[[]]] {{{}}} *** ___ --- ...", "e\u0301 combining accents a\u0300", "\ud7ff\ue000\uffff",
]


def _random_texts(n: int, seed: int):
    rng = random.Random(seed)
    ranges = [(0x20, 0x7E), (0xA0, 0x24F), (0x370, 0x4FF), (0x4E00, 0x4FFF), (0x3040, 0x30FF), (0xAC00, 0xAD00),
              (0x1F300, 0x1F6FF), (0x2000, 0x206F), (0x0, 0x1F), (0x600, 0x6FF), (0xFF00, 0xFFEF)]
    out = []
    for _ in range(n):
        parts = []
        for _ in range(rng.randint(0, 40)):
            lo, hi = rng.choice(ranges)
            parts.append(chr(rng.randint(lo, hi)))
            if rng.random() < 0.2:
                parts.append(rng.choice([" ", "  ", "&amp;", "&lt;", "<end_of_text>", "'s", "\n"]))
        out.append("".join(parts))
    return out


def test_merges_file_is_packaged_and_equal_to_open_clip():
    path = default_bpe_path()
    assert os.path.isfile(path)
    assert os.path.isfile(os.path.join(os.path.dirname(path), "LICENSE-bpe_simple_vocab_16e6.txt"))
    from open_clip.tokenizer import default_bpe

    with gzip.open(path) as a, gzip.open(default_bpe()) as b:
        assert a.read() == b.read()


def test_vocab_and_special_ids():
    tok = Tokenizer()
    assert tok.vocab_size == 49408 and tok.sot_token_id == 49406 and tok.eot_token_id == 49407


@pytest.mark.parametrize("context_length", [77, 1, 2, 5, 16, 100])
def test_hard_corpus_equals_open_clip(context_length):
    ours = tokenize(HARD, context_length=context_length)
    ref = open_clip.tokenize(HARD, context_length=context_length)
    assert ours.dtype == ref.dtype == torch.long and ours.shape == ref.shape
    bad = [(t, ours[i].tolist(), ref[i].tolist()) for i, t in enumerate(HARD) if not torch.equal(ours[i], ref[i])]
    assert not bad, bad[:2]


def test_random_unicode_equals_open_clip():
    texts = _random_texts(400, seed=1234)
    ours, ref = tokenize(texts), open_clip.tokenize(texts)
    bad = [t for i, t in enumerate(texts) if not torch.equal(ours[i], ref[i])]
    assert not bad, [ascii(t) for t in bad[:3]]


def test_single_string_truncation_and_exports():
    ids = fastclip.tokenize("a photo of a cat")
    assert ids.shape == (1, 77) and ids[0, 0] == 49406
    assert torch.equal(ids, open_clip.tokenize("a photo of a cat"))
    long = tokenize(["word " * 200])
    assert long[0, -1] == 49407 and (long[0] != 0).all()  # truncated rows still end in end-of-text
    assert decode([i for i in tokenize("a photo of a cat")[0].tolist() if i not in (0, 49406, 49407)]).strip() == \
        "a photo of a cat"


def test_at_least_as_fast_as_open_clip():
    rng = random.Random(0)
    words = "a photo of the cat dog sitting on red chair in front big house with trees at sunset".split()
    texts = [" ".join(rng.choice(words) for _ in range(rng.randint(5, 30))) for _ in range(2000)]
    tokenize(texts[:10]), open_clip.tokenize(texts[:10])

    def best(fn):
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            fn(texts)
            times.append(time.perf_counter() - t0)
        return min(times)

    ours, ref = best(tokenize), best(open_clip.tokenize)
    assert ours <= ref, f"fastclip {ours * 1e3:.0f} ms vs open_clip {ref * 1e3:.0f} ms for {len(texts)} texts"


# ---------------------------------------------------------------------------------------------------------------
# Hugging Face tokenizer files (SigLIP's SentencePiece Unigram, BERT's WordPiece), against open_clip's HFTokenizer

CORPUS = ["a photo of a cat", "A PHOTO of two dogs, running!", "the quick brown fox jumps over the lazy dog",
          "snake_case words and ALL-CAPS", "naïve café", "numbers 123 and 4.5", "a diagram of a neural network"] * 4
QUERIES = CORPUS[:7] + ["", "   ", "Hello, World!!!", "unseen vocabulary xyzzy qwerty", "word " * 40,
                        "&amp; html &lt;b&gt;", "tabs\tand\nnewlines", "snake_case_text"]


def _siglip_like(folder):
    """A tiny T5/SigLIP-style tokenizer: Unigram over Metaspace pieces, '</s>' appended, '<pad>' padding."""
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers

    tok = tokenizers.Tokenizer(models.Unigram())
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(CORPUS, trainers.UnigramTrainer(vocab_size=60, special_tokens=["<pad>", "</s>", "<unk>"],
                                                             unk_token="<unk>"))
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tok.save(os.path.join(folder, "tokenizer.json"))
    _write_config(folder, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def _bert_like(folder):
    """A tiny BERT-style tokenizer: lower-cased WordPiece, [CLS] ... [SEP], [PAD] padding."""
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import models, normalizers, pre_tokenizers, processors, trainers

    tok = tokenizers.Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
    tok.train_from_iterator(CORPUS, trainers.WordPieceTrainer(vocab_size=120, special_tokens=specials))
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]",
                                                       special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    tok.save(os.path.join(folder, "tokenizer.json"))
    _write_config(folder, pad_token="[PAD]", sep_token="[SEP]", cls_token="[CLS]", unk_token="[UNK]")


def _write_config(folder, **tokens):
    import json

    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 1000000, **tokens}, f)


@pytest.mark.parametrize("model_name, make, kwargs", [
    ("ViT-B-16-SigLIP", _siglip_like, {}),                               # clean="canonicalize" from its config
    ("ViT-B-16-SigLIP", _siglip_like, {"clean": "whitespace"}),
    ("ViT-L-14-CLIPA", _bert_like, {}),                                  # strip_sep_token=True from its config
    ("ViT-L-14-CLIPA", _bert_like, {"strip_sep_token": False, "clean": "lower"}),
])
def test_hf_tokenizer_file_equals_open_clip(tmp_path, model_name, make, kwargs):
    pytest.importorskip("transformers")
    from open_clip.tokenizer import HFTokenizer

    make(str(tmp_path))
    cfg = get_model_config(model_name)["text_cfg"]
    ref = HFTokenizer(str(tmp_path), context_length=cfg["context_length"],
                      **{**cfg.get("tokenizer_kwargs", {}), **kwargs})
    ours = fastclip.get_tokenizer(model_name, tokenizer_file=tmp_path / "tokenizer.json", **kwargs)
    assert ours.context_length == cfg["context_length"]
    for texts in (QUERIES, QUERIES[:1], "a single string"):
        torch.testing.assert_close(ours(texts), ref(texts), rtol=0, atol=0)
    for n in (2, 3, 8):  # truncation keeps the special tokens
        torch.testing.assert_close(ours(QUERIES, context_length=n), ref(QUERIES, context_length=n), rtol=0, atol=0)
    if make is _bert_like:  # [CLS] and [SEP] do not fit in one position: transformers fails, so does fastclip
        with pytest.raises(ValueError, match="special tokens"):
            ours(QUERIES, context_length=1)


def test_get_tokenizer_errors(tmp_path):
    with pytest.raises(ValueError, match="tokenizer_file="):
        fastclip.get_tokenizer("ViT-B-16-SigLIP")
    with pytest.raises(ValueError, match="raw SentencePiece model"):
        fastclip.get_tokenizer("ViT-B-16-SigLIP", tokenizer_file=tmp_path / "spiece.model")
    with pytest.raises(FileNotFoundError, match="downloads nothing"):
        fastclip.get_tokenizer("ViT-B-16-SigLIP", tokenizer_file=tmp_path / "missing.json")
    _siglip_like(str(tmp_path))
    os.remove(tmp_path / "tokenizer_config.json")
    with pytest.raises(ValueError, match="pad_token="):
        fastclip.get_tokenizer("ViT-B-16-SigLIP", tokenizer_file=tmp_path)
    tok = fastclip.get_tokenizer("ViT-B-16-SigLIP", tokenizer_file=tmp_path, pad_token="<pad>")
    assert tok("a cat").shape == (1, 64) and tok.pad_token_id == 0
    with pytest.raises(ValueError, match="clean"):
        fastclip.get_tokenizer("ViT-B-16-SigLIP", tokenizer_file=tmp_path, pad_token="<pad>", clean="bogus")
    # OpenAI's vocabulary: the BPE tokenizer, with the config's context length
    assert fastclip.get_tokenizer("ViT-B-32") is fastclip.get_tokenizer()
