"""PromptTokenizer (shared/inputs/tokenize.py): piece-by-piece tokenisation with memoised pieces gives exactly the
ids of tokenizing the whole text, turn after turn of a chat, for every tiny family's tokenizer and for a
Qwen2-style one (Split regex + ByteLevel, NFC); tokenizers whose pieces could depend on each other (an added
token with lstrip / rstrip, Metaspace's prepend "first", a normalized added token) are tokenized whole."""
from __future__ import annotations

import random

import pytest
from tokenizers import AddedToken, Regex, normalizers, pre_tokenizers

from mmpipe.shared.inputs.tokenize import PromptTokenizer
from mmpipe.shared.models.tiny import TINY_FAMILIES, ensure_tiny_model, train_tokenizer

WORDS = ["the", "image", " shows", "a", "red", "house", "\n", "  ", "\n\n", "é", "naïve", "日本", "12", "345",
         "don't", "!!", "\t", "<", "|", ">", "im_end", "user", ":", " ", "😀"]
CHATML = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|image_pad|>", "<|vision_start|>", "<|vision_end|>"]


def _texts(specials: list[str], rng: random.Random, n: int = 30) -> list[str]:
    out = []
    for _ in range(n):
        parts = []
        for _ in range(rng.randint(1, 40)):
            parts.append(rng.choice(specials) if rng.random() < 0.2 else rng.choice(WORDS))
        out.append("".join(parts))
    return out


def _same_every_turn(tok, texts: list[str]) -> PromptTokenizer:
    pt = PromptTokenizer(tok)
    for _ in range(2):  # the second pass hits the memo for every piece
        for text in texts:
            assert pt.encode(text) == tok(text, add_special_tokens=False).input_ids, text
            assert pt.encode(text, add_special_tokens=True) == tok(text, add_special_tokens=True).input_ids
    return pt


@pytest.mark.parametrize("family", [f for f in TINY_FAMILIES if f != "voxtral"])
def test_tiny_family_tokenizers_piecewise_and_exact(family):
    from mmpipe.shared.models.registry import load_processor, resolve_model

    path = str(ensure_tiny_model(family))
    resolved = resolve_model(path)
    tok = load_processor(path, resolved.cls).tokenizer
    specials = [t.content for t in tok.backend_tokenizer.get_added_tokens_decoder().values()]
    pt = _same_every_turn(tok, _texts(specials, random.Random(family)))
    assert pt.piecewise


def test_a_growing_chat_tokenizes_only_its_new_pieces():
    tok = train_tokenizer(CHATML, eos="<|im_end|>", pad="<|endoftext|>")
    pt = PromptTokenizer(tok)
    calls = []
    real = tok.__class__.__call__

    def counting(self, text, *a, **kw):
        calls.append(text)
        return real(self, text, *a, **kw)

    history = "<|im_start|>system\nYou describe pictures.<|im_end|>\n"
    turns = ["<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What is in it?<|im_end|>\n",
             "<|im_start|>assistant\nA red house.<|im_end|>\n<|im_start|>user\nAnd the sky?<|im_end|>\n"]
    tok.__class__.__call__ = counting
    try:
        for turn in turns:
            history += turn
            text = history + "<|im_start|>assistant\n"
            calls.clear()
            assert pt.encode(text) == real(tok, text, add_special_tokens=False).input_ids
    finally:
        tok.__class__.__call__ = real
    assert calls == [["assistant\nA red house.", "user\nAnd the sky?"]]  # only the pieces the last turn added


def test_qwen2_style_split_bytelevel_and_nfc():
    tok = train_tokenizer(CHATML, eos="<|im_end|>", pad="<|endoftext|>")
    b = tok.backend_tokenizer
    qwen_split = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                  r"\s*[\r\n]+|\s+(?!\S)|\s+")
    b.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(qwen_split), behavior="isolated"),
                                               pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    b.normalizer = normalizers.NFC()
    pt = _same_every_turn(tok, _texts(CHATML, random.Random(1)))
    assert pt.piecewise


@pytest.mark.parametrize("change", ["lstrip", "rstrip", "normalized", "metaspace_first", "prefix_space",
                                    "split_special"])
def test_tokenizers_whose_pieces_interact_are_tokenized_whole(change):
    tok = train_tokenizer(CHATML, eos="<|im_end|>", pad="<|endoftext|>")
    b = tok.backend_tokenizer
    if change in ("lstrip", "rstrip", "normalized"):
        tok.add_tokens([AddedToken("<sep>", **{change: True})])
        specials = CHATML + ["<sep>"]
    else:
        specials = CHATML
        if change == "metaspace_first":
            b.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
        elif change == "prefix_space":
            b.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
        else:
            b.encode_special_tokens = True
    pt = _same_every_turn(tok, _texts(specials, random.Random(2), n=10))
    assert not pt.piecewise


def test_the_memo_is_bounded():
    tok = train_tokenizer(CHATML, eos="<|im_end|>", pad="<|endoftext|>")
    pt = PromptTokenizer(tok, max_pieces=3, max_piece_chars=10)
    for i in range(10):
        text = f"<|im_start|>word {i}<|im_end|>" + "x" * 20
        assert pt.encode(text) == tok(text, add_special_tokens=False).input_ids
    assert len(pt._pieces) <= 3 and all(len(p) <= 10 for p in pt._pieces)


def test_the_memo_is_bounded_in_characters_too():
    """Many unique long pieces (an attacker's prompts) cannot grow the memo past max_chars in all."""
    tok = train_tokenizer(CHATML, eos="<|im_end|>", pad="<|endoftext|>")
    pt = PromptTokenizer(tok, max_pieces=1000, max_piece_chars=100, max_chars=250)
    for i in range(40):
        text = f"<|im_start|>{i:03d}" + "y" * 80 + "<|im_end|>"
        assert pt.encode(text) == tok(text, add_special_tokens=False).input_ids
    assert sum(len(p) for p in pt._pieces) == pt._chars <= 250 and len(pt._pieces) >= 2
