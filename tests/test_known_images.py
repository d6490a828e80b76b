"""An encoded image the loader decoded before is hashed but not decoded again (MediaLoader's KnownImages, the
`defer_decode` path the resolver and ingest take): the same content hash, size and cache key as a fresh
decode, the pixels decoded only when `materialize()` asks (and then the same pixels), the request's decode
budget charged the same; other bytes, another decode limit or another loader are never served from it; and
end to end, a chat that re-sends its image as a data: URL every turn gives the tokens of the uncached path, with
the embedding cache on, off, or under other mm_processor_kwargs."""
from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image

import mmpipe.shared.media.loader as loader_mod
from mmpipe import LLM, SamplingParams
from mmpipe.shared.errors import LimitExceededError
from mmpipe.shared.media.budget import BudgetLimits, RequestBudget
from mmpipe.shared.media.loader import MediaLoader
from offline_helpers import make_image, png_bytes, tiny_model_dirs  # noqa: F401 (a fixture)

GREEDY = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)


def data_url(b: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(b).decode()}"


@pytest.fixture
def decodes(monkeypatch):
    """How many times the loader decodes encoded image bytes."""
    calls = []
    real = loader_mod.decode_image

    def counting(*a, **kw):
        calls.append(1)
        return real(*a, **kw)

    monkeypatch.setattr(loader_mod, "decode_image", counting)
    return calls


@pytest.mark.parametrize("form", ["bytes", "data_url"])
def test_a_known_image_is_hashed_not_decoded(decodes, form):
    raw = png_bytes(make_image(seed=3))
    source = raw if form == "bytes" else data_url(raw)
    fresh = MediaLoader().load("image", source)
    loader = MediaLoader()
    first = loader.load("image", source, defer_decode=True)
    again = loader.load("image", source, defer_decode=True)
    assert len(decodes) == 2  # the fresh loader's and the first load's
    assert first.data is not None and again.data is None
    assert again.content_hash == first.content_hash == fresh.content_hash
    assert again.meta == first.meta == fresh.meta
    assert np.array_equal(np.asarray(again.materialize().data), np.asarray(fresh.data))
    assert len(decodes) == 3 and again.decode is None
    plain = loader.load("image", source)  # without defer_decode: decoded as always
    assert plain.data is not None and len(decodes) == 4


def test_other_bytes_or_another_loader_are_decoded(decodes):
    loader = MediaLoader()
    a, b = png_bytes(make_image(seed=1)), png_bytes(make_image(seed=2))
    ia = loader.load("image", a, defer_decode=True)
    ib = loader.load("image", b, defer_decode=True)
    assert ia.data is not None and ib.data is not None and ia.content_hash != ib.content_hash
    # the same pixels as another encoding: decoded (the memo keys the encoded form), same content hash
    buf = io.BytesIO()
    ia.data.save(buf, "PNG", compress_level=1)
    other = loader.load("image", buf.getvalue(), defer_decode=True)
    assert other.data is not None and other.content_hash == ia.content_hash
    assert MediaLoader().load("image", a, defer_decode=True).data is not None  # a loader's own memo only
    assert len(decodes) == 4


def _budget(image_pixels: int, request_pixels: int = 10**9) -> RequestBudget:
    return RequestBudget(BudgetLimits(image_pixels=image_pixels, request_pixels=request_pixels,
                                      request_audio_seconds=1e9))


def test_a_known_image_charges_the_budget_as_its_decode_did():
    raw = png_bytes(make_image(112, 84, seed=4))
    loader = MediaLoader()
    b1, b2 = _budget(10**8), _budget(10**8)
    loader.load("image", raw, budget=b1, defer_decode=True)
    item = loader.load("image", raw, budget=b2, defer_decode=True)
    assert item.data is None and b1.pixels == b2.pixels == 112 * 84
    with pytest.raises(LimitExceededError):  # a request without room for it is refused on a hit too
        loader.load("image", raw, budget=_budget(10**8, request_pixels=100), defer_decode=True)


def test_the_decode_limit_is_part_of_the_key():
    """A JPEG above the per-image limit decodes downscaled: under another limit the same bytes are other pixels."""
    img = Image.fromarray(np.random.default_rng(5).integers(0, 255, (256, 320, 3), dtype=np.uint8))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    raw = buf.getvalue()
    loader = MediaLoader()
    small = loader.load("image", raw, budget=_budget(160 * 128), defer_decode=True)
    full = loader.load("image", raw, budget=_budget(10**8), defer_decode=True)
    assert (small.meta["width"], full.meta["width"]) == (160, 320) and small.content_hash != full.content_hash
    again = loader.load("image", raw, budget=_budget(160 * 128), defer_decode=True)
    assert again.data is None and again.content_hash == small.content_hash
    assert np.array_equal(np.asarray(again.materialize().data), np.asarray(small.data))


# ---- end to end: a chat that re-sends its image every turn ------------------------------------------------
def _turns(url: str) -> list[list[dict]]:
    t1 = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                       {"type": "text", "text": "What is in this image?"}]}]
    t2 = t1 + [{"role": "assistant", "content": "A picture."}, {"role": "user", "content": "And the sky?"}]
    t3 = t2 + [{"role": "assistant", "content": "Grey."}, {"role": "user", "content": "How many people?"}]
    return [t1, t2, t3]


def _tokens(llm: LLM, turns, **kw) -> list[list[int]]:
    return [llm.chat(t, GREEDY, use_tqdm=False, **kw)[0].outputs[0].token_ids for t in turns]


@pytest.mark.parametrize("mm_cache", ["memory", None])
def test_a_chat_resending_its_image_gives_the_uncached_tokens(tiny_model_dirs, decodes, mm_cache):
    path = str(tiny_model_dirs["qwen2_5_vl"])
    url = data_url(png_bytes(make_image(112, 84, seed=6)))
    turns = _turns(url)
    reference = [_tokens(LLM(path, device="cpu", mm_cache=mm_cache, enable_prefix_caching=False), [t])[0]
                 for t in turns]  # every turn on a fresh LLM: nothing known, nothing cached
    n_fresh = len(decodes)
    llm = LLM(path, device="cpu", mm_cache=mm_cache)
    assert _tokens(llm, turns) == reference
    # one decode for the whole chat with the embedding cache; without it every turn needs the pixels again
    assert len(decodes) - n_fresh == (1 if mm_cache else 3)
    refs = [llm.resolver.resolve_keyed([_refs(llm, url)])[0][0][1] for _ in range(2)]  # the cache keys
    fresh = LLM(path, device="cpu", mm_cache=mm_cache)
    assert refs[0] == refs[1] == fresh.resolver.resolve_keyed([_refs(fresh, url)])[0][0][1]


def _refs(llm: LLM, url: str):
    from mmpipe.shared.chat.messages import parse_messages
    from mmpipe.shared.inputs.chat_items import chat_item_refs

    return chat_item_refs(parse_messages(_turns(url)[0]).parts, llm._parse_options())


def test_other_mm_processor_kwargs_do_not_reuse_the_embedding(tiny_model_dirs):
    path = str(tiny_model_dirs["qwen2_5_vl"])
    url = data_url(png_bytes(make_image(112, 84, seed=7)))
    turn = _turns(url)[1]
    kw = {"max_pixels": 56 * 56}
    llm = LLM(path, device="cpu")
    default = llm.chat(turn, GREEDY, use_tqdm=False)[0]
    small = llm.chat(turn, GREEDY, use_tqdm=False, mm_processor_kwargs=kw)[0]
    want = LLM(path, device="cpu").chat(turn, GREEDY, use_tqdm=False, mm_processor_kwargs=kw)[0]
    assert small.outputs[0].token_ids == want.outputs[0].token_ids
    assert small.prompt_token_ids == want.prompt_token_ids != default.prompt_token_ids  # fewer image rows
    assert llm.stats["items_encoded"] == 2
