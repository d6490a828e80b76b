"""IncrementalDetokenizer: incremental text equals a full decode; stop strings cut the text (or keep the stop
string with include_stop_str_in_output) and are never partly streamed."""
from __future__ import annotations

import pytest

from mmpipe.shared.detokenizer import IncrementalDetokenizer
from mmpipe.shared.types import SamplingParams

from engine_helpers import get_case

TEXT = "The quick brown fox jumps over the lazy dog. Hello, how are you? é ü 日本 ok"


@pytest.fixture(scope="module")
def tok():
    return get_case("qwen2_vl").processor.tokenizer


def feed(tok, sampling, ids, chunk=1):
    det = IncrementalDetokenizer(tok, sampling)
    deltas, n = [], 0
    for i in range(0, len(ids), chunk):
        det.add_tokens(ids[i:i + chunk])
        deltas.append(det.take_new_text())
        n = i + chunk
        if det.stopped:
            break
    deltas.append(det.take_new_text(finished=True))
    return det, deltas, n


@pytest.mark.parametrize("chunk", [1, 3])
def test_incremental_text_equals_full_decode(tok, chunk):
    ids = tok.encode(TEXT, add_special_tokens=False)
    det, deltas, _ = feed(tok, SamplingParams(), ids, chunk)
    assert "".join(deltas) == TEXT == det.output_text
    assert not det.stopped and det.stop_reason is None
    assert all("\ufffd" not in d for d in deltas)  # split multi-byte characters are never shown half


def test_stop_string_truncates_and_reports_stop(tok):
    ids = tok.encode(TEXT, add_special_tokens=False)
    det, deltas, n = feed(tok, SamplingParams(stop=["lazy dog", "zzz"]), ids)
    assert det.stopped and det.stop_reason == "lazy dog"
    assert det.stop_token_count == len(det.token_ids) <= n
    assert det.output_text == "The quick brown fox jumps over the " == "".join(deltas)
    assert n < len(ids)  # the caller could stop generating right there
    assert not any("lazy" in d for d in deltas)


def test_include_stop_str_in_output(tok):
    ids = tok.encode(TEXT, add_special_tokens=False)
    det, deltas, _ = feed(tok, SamplingParams(stop="fox", include_stop_str_in_output=True), ids)
    assert det.output_text == "".join(deltas) == "The quick brown fox"


def test_stop_string_inside_one_token_and_earliest_wins(tok):
    ids = tok.encode(TEXT, add_special_tokens=False)
    det, _, _ = feed(tok, SamplingParams(stop=["over", "qu"]), ids, chunk=5)
    assert det.output_text == "The " and det.stop_reason == "qu"


def test_stop_strings_wait_for_min_tokens(tok):
    ids = tok.encode(TEXT, add_special_tokens=False)
    det, _, _ = feed(tok, SamplingParams(stop=["The", "fox"], min_tokens=2), ids)
    assert det.output_text == "The quick brown "


def test_special_tokens_skipped(tok):
    ids = tok.encode("Hello", add_special_tokens=False) + [tok.convert_tokens_to_ids("<|im_end|>")]
    det, deltas, _ = feed(tok, SamplingParams(), ids)
    assert det.output_text == "Hello"
    det, _, _ = feed(tok, SamplingParams(skip_special_tokens=False), ids)
    assert det.output_text == "Hello<|im_end|>"


class _DecodeOnly:
    """The tokenizer seen through `decode` alone, as a tokenizer without a Rust backend offers it: this takes
    the detokenizer's Python window path instead of `tokenizers.decoders.DecodeStream`."""

    def __init__(self, tok):
        self.decode = tok.decode


@pytest.mark.parametrize("family", ["qwen2_vl", "llava"])
@pytest.mark.parametrize("skip", [True, False])
def test_rust_decode_stream_equals_the_python_window(family, skip):
    """DecodeStream (the fast path) and the windowed `decode` (the fallback) give the same text, token by token,
    on random token sequences: split multi-byte characters, special tokens, byte soup that is not UTF-8."""
    import random

    tok = get_case(family).processor.tokenizer
    assert IncrementalDetokenizer(tok, SamplingParams())._backend is not None  # fast tokenizers take DecodeStream
    rng = random.Random(7)
    sp = SamplingParams(skip_special_tokens=skip)
    for _ in range(150):
        ids = [rng.randrange(len(tok)) for _ in range(rng.randrange(1, 40))]
        fast, slow = IncrementalDetokenizer(tok, sp), IncrementalDetokenizer(_DecodeOnly(tok), sp)
        assert slow._backend is None
        for t in ids:
            fast.add_tokens([t])
            slow.add_tokens([t])
            assert fast.take_new_text() == slow.take_new_text(), ids
        assert fast.output_text == slow.output_text
    text_ids = tok.encode(TEXT, add_special_tokens=False)
    fast = IncrementalDetokenizer(tok, sp)
    fast.add_tokens(text_ids)
    assert fast.output_text == tok.decode(text_ids, skip_special_tokens=skip, clean_up_tokenization_spaces=False)
