"""Prefix caching that understands media: greedy outputs token-identical with the cache on and off and to
transformers (tiny llava, and qwen2_5_vl with M-RoPE, an image and a video), hits where prompts share a prefix,
no hit past a media item whose identity differs (content, UUID tenant), correct sharing when requests arrive
while the shared blocks are being written, preemption and eviction under a tiny KV budget; the offline API
end to end (content-hash and UUID keys from the resolver, `num_cached_tokens` on the outputs)."""
from __future__ import annotations

import pytest
import torch

from mmpipe.shared.cache.keys import CacheKeyspace, model_fingerprint, settings_digest
from mmpipe.shared.engine import EngineConfig, LLMEngine
from mmpipe.shared.engine.block_manager import cdiv
from mmpipe.shared.errors import InvalidInputError
from mmpipe.shared.inputs.assemble import expand_prompt
from mmpipe.shared.types import EngineRequest, MMEmbedding, MMSpan, SamplingParams

from engine_helpers import (REF_TOKENS, Prompt, _media_parts, build_prompt, get_case, make_image, make_video,
                            run_engine)

FAMILIES = ["llava", "qwen2_5_vl"]
BS = 4  # small blocks: a tiny prompt spans many, and a media item several

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(2)


# ---- helpers -------------------------------------------------------------------------------------------------
def req(p: Prompt, rid: str, keys: list[str | None] | None = None, n: int = REF_TOKENS,
        logprobs: bool = False) -> EngineRequest:
    sp = SamplingParams(max_tokens=n, temperature=0.0, logprobs=0 if logprobs else None)
    return p.request(rid, sp, mm_spans=p.mm_spans(keys))


def engine(case, on: bool = True, **kw) -> LLMEngine:
    return LLMEngine(case.model, EngineConfig(block_size=BS, enable_prefix_caching=on, **kw))


def full_hit(p: Prompt) -> int:
    """Tokens a full hit serves: every full block but one token always computed."""
    return (len(p.token_ids) - 1) // BS * BS


def first_media(p: Prompt) -> int:
    return int(p.mm_positions.min())


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def assert_idle(eng: LLMEngine) -> None:
    info = eng.kv_cache_info()
    assert info["free_blocks"] == info["num_blocks"], info


def variant(case, content_text: str | None = None, image_seed: int | None = None, prompt_index: int = 0) -> Prompt:
    """Prompt `prompt_index` of the family with its text and/or its image replaced (same image size)."""
    content, media = _media_parts(case.family)[prompt_index]
    content = [dict(c) for c in content]
    if content_text is not None:
        content[-1]["text"] = content_text
    media = dict(media)
    if image_seed is not None:
        size = media["images"][0].size
        media["images"] = [make_image(*size, seed=image_seed)]
    return build_prompt(case.family, case.model, case.processor, [{"role": "user", "content": content}], media)


# ---- block keys, request fields ------------------------------------------------------------------------------
def test_expand_prompt_records_each_item_span_and_key():
    emb = [MMEmbedding("image", torch.zeros(3, 4)), MMEmbedding("video", torch.zeros(2, 4)),
           MMEmbedding("image", torch.zeros(1, 4))]
    ids, positions, ordered, spans = expand_prompt([7, 100, 8, 101, 100, 9], emb, {"image": 100, "video": 101},
                                                   ["k-img0", "k-vid", None])
    assert ids == [7, 100, 100, 100, 8, 101, 101, 100, 9]
    assert positions == [1, 2, 3, 5, 6, 7]
    assert [o.num_tokens for o in ordered] == [3, 2, 1]
    assert spans == [MMSpan(1, 3, "k-img0"), MMSpan(5, 2, "k-vid"), MMSpan(7, 1, None)]
    with pytest.raises(InvalidInputError):
        expand_prompt([100], emb[:1], {"image": 100}, ["a", "b"])


def test_spans_must_describe_the_rows():
    case = get_case("llava")
    a = case.prompts[0]
    eng = engine(case, num_kv_blocks=64)
    good = a.mm_spans()
    eng.validate_request(a.request("ok", mm_spans=good))
    (s,) = good
    for bad in ([MMSpan(s.offset + 1, s.length, s.key)], [MMSpan(s.offset, s.length - 1, s.key)],
                [MMSpan(s.offset, 2, "x"), MMSpan(s.offset + 1, s.length - 1, "y")]):
        with pytest.raises(InvalidInputError):
            eng.validate_request(a.request("bad", mm_spans=bad))


# ---- engine: hits and isolation ------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_repeated_prompt_is_served_from_the_cache(family):
    case = get_case(family)
    a, _, c = case.prompts  # qwen2_5_vl's a holds an image and a video
    for on in (True, False):
        eng = engine(case, on)
        first = run_engine(eng, {0: [req(a, "a1"), req(c, "c1")]})
        again = run_engine(eng, {0: [req(a, "a2"), req(c, "c2")]})
        for r, rid in ((first, "a1"), (again, "a2")):
            assert r.tokens[rid] == a.ref, (on, rid)
        assert first.tokens["c1"] == again.tokens["c2"] == c.ref
        # c1 joins a1's step: it may share the chat template's first blocks, written in that very step
        want_first = {"a1": 0, "c1": min(common_prefix(a.token_ids, c.token_ids), len(c.token_ids) - 1) // BS * BS}
        want = {"a2": full_hit(a), "c2": full_hit(c)}
        if not on:
            want_first, want = dict.fromkeys(want_first, 0), dict.fromkeys(want, 0)
        assert first.cached == want_first and again.cached == want, on
        st = eng.stats
        assert st["prefix_cache_hits"] == sum(want_first.values()) + sum(want.values())
        assert st["prefix_cache_queries"] == (2 * (len(a.token_ids) + len(c.token_ids)) if on else 0)
        assert (st["prefix_cache_cached_blocks"] > 0) == on
        assert_idle(eng)


@pytest.mark.parametrize("family", FAMILIES)
def test_shared_prefix_with_a_different_question(family):
    case = get_case(family)
    a = case.prompts[0]
    q = variant(case, content_text="Tell me what you see there, please.")
    assert q.token_ids != a.token_ids and q.ref
    media_end = int(a.mm_positions.max()) + 1
    eng = engine(case)
    r1 = run_engine(eng, {0: [req(a, "a")]})
    r2 = run_engine(eng, {0: [req(q, "q")]})
    assert r1.tokens["a"] == a.ref and r2.tokens["q"] == q.ref
    want = min(common_prefix(a.token_ids, q.token_ids), len(q.token_ids) - 1) // BS * BS
    assert r2.cached["q"] == want and want >= media_end // BS * BS > 0
    off = run_engine(engine(case, False), {0: [req(q, "q")]})
    assert off.tokens["q"] == q.ref and off.cached["q"] == 0


@pytest.mark.parametrize("family", FAMILIES)
def test_prompt_differing_only_in_the_image_does_not_reuse_its_blocks(family):
    case = get_case(family)
    a = case.prompts[0]
    other = variant(case, image_seed=7)
    assert other.token_ids == a.token_ids  # same ids (same grid), other pixels
    assert not torch.equal(other.mm_embeds, a.mm_embeds)
    eng = engine(case)
    run_engine(eng, {0: [req(a, "a")]})
    got = run_engine(eng, {0: [req(other, "o", logprobs=True)]})
    ref = run_engine(engine(case, False), {0: [req(other, "o", logprobs=True)]})
    assert got.tokens["o"] == other.ref == ref.tokens["o"]
    assert got.cached["o"] == first_media(a) // BS * BS  # up to the block holding the image's first row
    torch.testing.assert_close(torch.tensor(got.logprobs["o"]), torch.tensor(ref.logprobs["o"]), atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_uuid_keys_never_share_across_tenants(family):
    case = get_case(family)
    p = case.prompts[1]  # one image
    ks = CacheKeyspace(model_fingerprint("tiny-" + family, {}), settings_digest({}))
    alice = [ks.uuid_key("image", "photo-1", tenant="alice")]
    bob = [ks.uuid_key("image", "photo-1", tenant="bob")]
    eng = engine(case)
    runs = [run_engine(eng, {0: [req(p, rid, keys)]}) for rid, keys in (("a1", alice), ("b1", bob), ("a2", alice),
                                                                        ("n", [None]))]
    for r, rid in zip(runs, ("a1", "b1", "a2", "n")):
        assert r.tokens[rid] == p.ref, rid
    before_image = first_media(p) // BS * BS
    assert [r.cached[rid] for r, rid in zip(runs, ("a1", "b1", "a2", "n"))] == [0, before_image, full_hit(p),
                                                                                before_image]


@pytest.mark.parametrize("family", FAMILIES)
def test_three_turn_conversation_over_one_image(family):
    case = get_case(family)
    content, media = _media_parts(family)[1]  # one image and a question
    media = {"images": media["images"]}
    turns = [[{"role": "user", "content": content}]]
    for answer, question in (("It shows random coloured noise.", "Which colour is the most common?"),
                             ("Mostly grey, I think.", "Describe it once more, briefly.")):
        turns.append(turns[-1] + [{"role": "assistant", "content": [{"type": "text", "text": answer}]},
                                  {"role": "user", "content": [{"type": "text", "text": question}]}])
    prompts = [build_prompt(family, case.model, case.processor, msgs, media) for msgs in turns]
    on, off = engine(case), engine(case, False)
    seen: list[int] = []  # tokens of the previous turn whose K/V are in the cache (prompt + output but the last)
    for i, p in enumerate(prompts):
        got = run_engine(on, {0: [req(p, f"t{i}")]})
        ref = run_engine(off, {0: [req(p, f"t{i}")]})
        assert got.tokens[f"t{i}"] == ref.tokens[f"t{i}"] == p.ref, i
        want = min(common_prefix(seen, p.token_ids), len(p.token_ids) - 1) // BS * BS if seen else 0
        assert got.cached[f"t{i}"] == want, i
        if i:
            assert want > int(p.mm_positions.max()), "the image's blocks are reused"
        seen = p.token_ids + got.tokens[f"t{i}"][:-1]
    assert_idle(on)


@pytest.mark.parametrize("family", FAMILIES)
def test_requests_arriving_while_the_shared_blocks_are_written(family):
    case = get_case(family)
    a = case.prompts[0]
    L = len(a.token_ids)
    # same step: the second request reads blocks the first one writes in that very step
    eng = engine(case)
    same = run_engine(eng, {0: [req(a, "x"), req(a, "y")]})
    assert same.tokens["x"] == same.tokens["y"] == a.ref
    assert same.cached == {"x": 0, "y": full_hit(a)}
    # chunked: the first prompt takes two steps; the next request joins in its second one, the third later
    budget = L // 2 + 2
    eng = engine(case, max_num_batched_tokens=budget)
    chunked = run_engine(eng, {0: [req(a, "x")], 1: [req(a, "y")], 2: [req(a, "z")]})
    for rid in "xyz":
        assert chunked.tokens[rid] == a.ref, rid
    assert chunked.cached == {"x": 0, "y": full_hit(a), "z": full_hit(a)}
    assert_idle(eng)


@pytest.mark.parametrize("family", FAMILIES)
def test_preemption_with_a_tiny_kv_budget(family):
    case = get_case(family)
    a, b, c = case.prompts
    longest = max(len(p.token_ids) for p in case.prompts) + REF_TOKENS
    # a and b fit, a second a fits beside them only by sharing a's blocks, then all of them must grow
    blocks = max(cdiv(len(a.token_ids), BS) + cdiv(len(b.token_ids), BS) + 1, cdiv(longest, BS))
    outs = {}
    for on in (True, False):
        eng = engine(case, on, num_kv_blocks=blocks, max_num_batched_tokens=64)
        res = run_engine(eng, {0: [req(a, "a1"), req(b, "b"), req(a, "a2")], 3: [req(c, "c"), req(a, "a3")]})
        assert eng.kv_cache_info()["num_preemptions"] > 0, on
        for rid, p in (("a1", a), ("a2", a), ("a3", a), ("b", b), ("c", c)):
            assert res.tokens[rid] == p.ref, (on, rid)
        assert_idle(eng)
        outs[on] = res
    assert outs[True].cached["a2"] == full_hit(a)


@pytest.mark.parametrize("family", FAMILIES)
def test_preempted_in_the_middle_of_its_prefill(family):
    """A prompt chunked over many steps is preempted half-way: only the blocks it has written may be found
    again when it comes back (a key registered ahead of the write would serve K/V never computed)."""
    case = get_case(family)
    _, b, c = case.prompts
    # c decodes; b is admitted with exactly the blocks left, in chunks of 3, until c's growth preempts it
    blocks = cdiv(len(c.token_ids), BS) + 1 + cdiv(len(b.token_ids), BS)
    for on in (True, False):
        eng = engine(case, on, num_kv_blocks=blocks, max_num_batched_tokens=4)
        res = run_engine(eng, {0: [req(c, "c")], 1: [req(b, "b")]})
        assert eng.kv_cache_info()["num_preemptions"] > 0, on
        assert res.tokens["b"] == b.ref and res.tokens["c"] == c.ref, on
        assert_idle(eng)


@pytest.mark.parametrize("family", FAMILIES)
def test_eviction_under_pressure(family):
    case = get_case(family)
    prompts = list(case.prompts) + [variant(case, image_seed=s) for s in (11, 12)]
    longest = max(len(p.token_ids) for p in prompts) + REF_TOKENS
    blocks = cdiv(longest, BS) + 1  # room for about one sequence: every new prompt evicts older blocks
    eng = engine(case, num_kv_blocks=blocks)
    for rnd in range(2):
        for i, p in enumerate(prompts):
            r = run_engine(eng, {0: [req(p, f"{rnd}-{i}")]})
            assert r.tokens[f"{rnd}-{i}"] == p.ref, (rnd, i)
            assert eng.stats["prefix_cache_cached_blocks"] <= blocks
        assert_idle(eng)
    assert eng.stats["prefix_cache_evictions"] > 0
    last = prompts[-1]  # the most recently used prompt is still whole in the cache
    again = run_engine(eng, {0: [req(last, "last")]})
    assert again.tokens["last"] == last.ref and again.cached["last"] == full_hit(last)
    # several at once under the same pressure: blocks in use are never evicted
    mixed = run_engine(eng, {0: [req(p, f"m{i}") for i, p in enumerate(prompts)]})
    for i, p in enumerate(prompts):
        assert mixed.tokens[f"m{i}"] == p.ref, i
    assert_idle(eng)


def test_video_item_is_keyed_like_an_image():
    case = get_case("qwen2_5_vl")
    a = case.prompts[0]  # image then video
    img, vid = a.mm_spans()
    content, media = _media_parts("qwen2_5_vl")[0]
    media = dict(media, videos=[make_video(4, 56, 84, seed=9)])
    other_video = build_prompt("qwen2_5_vl", case.model, case.processor, [{"role": "user", "content": content}],
                               media)
    assert other_video.token_ids == a.token_ids and other_video.mrope_positions.equal(a.mrope_positions)
    eng = engine(case)
    run_engine(eng, {0: [req(a, "a")]})
    r = run_engine(eng, {0: [req(other_video, "v")]})
    assert r.tokens["v"] == other_video.ref
    assert r.cached["v"] == vid.offset // BS * BS  # the image's blocks are shared, the video's are not
    assert r.cached["v"] > img.offset + img.length - BS


# ---- the offline API: keys from the resolver, num_cached_tokens on the outputs -----------------------------
@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    from mmpipe.shared.models.tiny import build_tiny_model

    return build_tiny_model("qwen2_5_vl", tmp_path_factory.mktemp("prefix-cache") / "qwen2_5_vl")


def _llm(path, **kw):
    from mmpipe import LLM

    return LLM(str(path), device="cpu", block_size=BS, kv_cache_blocks=256, **kw)


@pytest.mark.parametrize("mm_cache", ["memory", None])
def test_offline_repeat_and_image_swap(qwen_dir, mm_cache):
    """Content-hash keys, with the embedding cache on and off: a repeat hits the whole prompt, a prompt that
    differs only in its image stops before the image; outputs are transformers'."""
    from offline_helpers import hf_generate, make_image as img_of, make_video as vid_of

    llm = _llm(qwen_dir, mm_cache=mm_cache)
    ip, vp = llm.adapter.placeholder_token("image"), llm.adapter.placeholder_token("video")
    prompt = f"Look at {ip} and at {vp}, then describe both of them."
    img, other, vid = img_of(seed=3), img_of(seed=8), vid_of(seed=4)
    greedy = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)

    def gen(image):
        return llm.generate({"prompt": prompt, "multi_modal_data": {"image": image, "video": vid}}, greedy,
                            use_tqdm=False)[0]

    first, again, swapped = gen(img), gen(img), gen(other)
    ref = hf_generate(qwen_dir, prompt, images=[img], videos=[vid])
    assert first.outputs[0].token_ids == again.outputs[0].token_ids == ref
    assert swapped.outputs[0].token_ids == hf_generate(qwen_dir, prompt, images=[other], videos=[vid])
    n = len(again.prompt_token_ids)
    image_start = again.prompt_token_ids.index(llm.adapter.placeholder_id("image"))
    assert (first.num_cached_tokens, again.num_cached_tokens, swapped.num_cached_tokens) == (
        0, (n - 1) // BS * BS, image_start // BS * BS)


def test_offline_uuids_and_cache_off(qwen_dir):
    """UUID keys: another UUID over the same content does not share the image's blocks, the same UUID does;
    with prefix caching off nothing is served from the cache."""
    from offline_helpers import hf_generate, make_image as img_of

    img = img_of(seed=5)
    greedy = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    llm = _llm(qwen_dir)
    prompt = f"What is in {llm.adapter.placeholder_token('image')}? Answer briefly."
    ref = hf_generate(qwen_dir, prompt, images=[img], max_new_tokens=6)

    def gen(model, uuid):
        return model.generate({"prompt": prompt, "multi_modal_data": {"image": img},
                               "multi_modal_uuids": {"image": [uuid]}}, greedy, use_tqdm=False)[0]

    outs = [gen(llm, u) for u in ("u-1", "u-2", "u-1")]
    assert all(o.outputs[0].token_ids == ref for o in outs)
    n = len(outs[0].prompt_token_ids)
    image_start = outs[0].prompt_token_ids.index(llm.adapter.placeholder_id("image"))
    assert [o.num_cached_tokens for o in outs] == [0, image_start // BS * BS, (n - 1) // BS * BS]

    off = _llm(qwen_dir, enable_prefix_caching=False)
    outs = [gen(off, "u-1") for _ in range(2)]
    assert all(o.outputs[0].token_ids == ref and o.num_cached_tokens == 0 for o in outs)
    assert off.engine.stats["prefix_cache_cached_blocks"] == 0


# ---- the generator service's side: flag and wire field ----------------------------------------------------
def test_generator_flag_and_token_chunk_carry_prefix_caching(monkeypatch):
    import argparse

    from mmpipe.services.common.convert import TokenChunk
    from mmpipe.services.generator.config import GeneratorConfig

    def parse(*argv: str) -> GeneratorConfig:
        p = argparse.ArgumentParser()
        GeneratorConfig.add_args(p)
        return GeneratorConfig.from_args(p.parse_args(["--model", "m", "--redis-url", "redis://x", *argv]))

    assert parse().enable_prefix_caching is True
    assert parse("--no-enable-prefix-caching").enable_prefix_caching is False
    monkeypatch.setenv("MMPIPE_ENABLE_PREFIX_CACHING", "0")
    assert parse().enable_prefix_caching is False
    assert parse("--enable-prefix-caching").enable_prefix_caching is True
    chunk = TokenChunk([5, 6], None, "", True, "stop", 40, 32)
    assert TokenChunk.from_pb(chunk.to_pb()) == chunk
