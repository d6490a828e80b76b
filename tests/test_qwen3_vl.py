"""Qwen3-VL, dense and sparse-MoE (every test runs for both families), through the offline LLM: several images of
different sizes with a video (frame timestamps in the prompt), `image_embeds` in vLLM's layout (base embedding
and deepstack features along the hidden dimension), checked against transformers'
`model.generate(**processor(...))`; the MoE block (router, experts) against transformers' own. The engine-level
cases (staggered arrivals, chunked prefill through image rows, preemption, cancellation) run in
test_engine_parity.py, the Triton path in test_engine_triton_interp.py."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from mmpipe import LLM, SamplingParams
from mmpipe.shared.errors import InvalidInputError, UnsupportedError
from offline_helpers import (  # noqa: F401 (tiny_model_dirs is a fixture)
    ENGINE, hf_generate, make_image, make_video, oracle_model, tiny_model_dirs,
)

GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
IMG = "<|vision_start|><|image_pad|><|vision_end|>"
VID = "<|vision_start|><|video_pad|><|vision_end|>"


def _chat(content: str) -> str:
    return f"<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module", params=["qwen3_vl", "qwen3_vl_moe"])
def path(request, tiny_model_dirs):  # noqa: F811
    return str(tiny_model_dirs[request.param])


@pytest.fixture(scope="module")
def llm(path):
    return LLM(path, device="cpu", engine=ENGINE, enable_mm_embeds=True)


def test_images_of_different_sizes_and_a_video(llm, path):
    imgs = [make_image(112, 84, seed=1), make_image(64, 128, seed=2), make_image(96, 96, seed=3)]
    vid = make_video(n=6, h=64, w=96, seed=4)
    prompt = _chat(f"{IMG}first {VID}then {IMG}{IMG}Describe them.")
    out = llm.generate({"prompt": prompt, "multi_modal_data": {"image": imgs, "video": vid}}, GREEDY,
                       use_tqdm=False)[0]
    assert out.outputs[0].token_ids == hf_generate(path, prompt, images=imgs, videos=[vid])
    # the video's frame timestamps are in the prompt the engine ran, as the processor writes them
    assert "<0.0 seconds>" in llm.tokenizer.decode(out.prompt_token_ids)
    other = llm.generate({"prompt": prompt, "multi_modal_data": {"image": imgs[::-1], "video": vid}}, GREEDY,
                         use_tqdm=False)[0]
    assert other.outputs[0].token_ids != out.outputs[0].token_ids  # the answer depends on the images


def _image_embeds(path: str, img) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' own features of one image, in vLLM's Qwen3-VL layout, and its grid."""
    model, processor = oracle_model(path)
    inp = processor(text="<|image_pad|>", images=[img], return_tensors="pt")
    with torch.inference_mode():
        o = model.model.get_image_features(inp["pixel_values"], inp["image_grid_thw"])
    rows = torch.cat([o.pooler_output[0], *(layer[0] for layer in o.deepstack_features)], dim=-1)
    return rows, inp["image_grid_thw"]


def test_image_embeds_carry_the_deepstack_features(llm, path):
    img = make_image(96, 64, seed=7)
    prompt = _chat(f"{IMG}What is this?")
    ref = hf_generate(path, prompt, images=[img])
    rows, grid = _image_embeds(path, img)
    hidden = llm.adapter.hidden_size
    assert rows.shape[1] == hidden * (1 + llm.adapter.num_deepstack) and llm.adapter.num_deepstack == 2
    before = llm.stats["items_encoded"]
    out = llm.generate({"prompt": prompt, "multi_modal_data": {"image": {"image_embeds": rows, "image_grid_thw": grid}}},
                       GREEDY, use_tqdm=False)[0]
    assert out.outputs[0].token_ids == ref
    assert llm.stats["items_encoded"] == before
    # the deepstack columns are used: without them the answer changes
    flat = rows.clone()
    flat[:, hidden:] = 0
    out = llm.generate({"prompt": prompt, "multi_modal_data": {"image": {"image_embeds": flat, "image_grid_thw": grid}}},
                       GREEDY, use_tqdm=False)[0]
    assert out.outputs[0].token_ids != ref


def test_bad_image_embeds_name_the_field_and_the_llm_keeps_serving(llm, path):
    img = make_image(96, 64, seed=8)
    rows, grid = _image_embeds(path, img)
    prompt = _chat(f"{IMG}What is this?")
    hidden = llm.adapter.hidden_size
    bad = {"base embedding only": rows[:, :hidden], "one deepstack feature short": rows[:, :2 * hidden],
           "wrong row count": rows[1:], "not finite": torch.where(torch.arange(rows.shape[1]) == 2 * hidden,
                                                                   float("nan"), rows)}
    for what, t in bad.items():
        with pytest.raises(InvalidInputError) as e:
            llm.generate({"prompt": prompt, "multi_modal_data": {"image": {"image_embeds": t, "image_grid_thw": grid}}},
                         GREEDY, use_tqdm=False)
        assert e.value.param == "image_embeds", what
    with pytest.raises(UnsupportedError) as e:
        llm.generate({"prompt": _chat(f"{VID}?"), "multi_modal_data": {
            "video": {"video_embeds": rows, "video_grid_thw": grid}}}, GREEDY, use_tqdm=False)
    assert e.value.param == "video_embeds"
    out = llm.generate({"prompt": prompt, "multi_modal_data": {"image": img}}, GREEDY, use_tqdm=False)[0]
    assert out.outputs[0].token_ids == hf_generate(path, prompt, images=[img])


def test_batch_mixed_with_other_prompts_under_preemption(path):
    """Three prompts in one call (image + video, two images, text only) on a KV cache too small for all three:
    requests are preempted and recomputed with the same rows, timestamps and positions."""
    llm = LLM(path, device="cpu", engine=ENGINE, kv_cache_blocks=20, block_size=4, max_num_batched_tokens=32,
              enable_prefix_caching=False)
    imgs = [make_image(112, 84, seed=31), make_image(64, 96, seed=32)]
    vid = make_video(n=4, h=64, w=96, seed=33)
    sp = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    prompts = [{"prompt": _chat(f"{IMG}{VID}Describe the image and the video."),
                "multi_modal_data": {"image": imgs[0], "video": vid}},
               {"prompt": _chat(f"{IMG}and {IMG}What differs?"), "multi_modal_data": {"image": imgs[::-1]}},
               {"prompt": _chat("Hello, how are you? Tell me a story.")}]
    outs = llm.generate(prompts, sp, use_tqdm=False)
    assert llm.engine.kv_cache_info()["num_preemptions"] > 0
    refs = [hf_generate(path, prompts[0]["prompt"], images=imgs[:1], videos=[vid], max_new_tokens=12),
            hf_generate(path, prompts[1]["prompt"], images=imgs[::-1], max_new_tokens=12),
            hf_generate(path, prompts[2]["prompt"], max_new_tokens=12)]
    assert [o.outputs[0].token_ids for o in outs] == refs


@pytest.mark.parametrize("norm_topk_prob", [True, False])
def test_moe_block_matches_transformers(tiny_model_dirs, norm_topk_prob):  # noqa: F811
    """The engine's router and grouped experts (both op sets call shared/engine/moe.py) over the HF block's own
    weights, against transformers' block with both of its experts implementations (eager loop, grouped_mm);
    without renormalisation (a Qwen3-MoE-style config's `norm_topk_prob: false`) against a by-hand reference."""
    from mmpipe.shared.engine.model_spec import read_spec
    from mmpipe.shared.engine.moe import sparse_moe

    model, _ = oracle_model(str(tiny_model_dirs["qwen3_vl_moe"]))
    lm = model.model.language_model
    spec = read_spec(model, lm).moe
    assert spec.layers == (True, True, False) and spec.top_k == 2 and spec.norm_topk_prob
    spec = dataclasses.replace(spec, norm_topk_prob=norm_topk_prob)
    block = lm.layers[0].mlp
    e = block.experts
    inter = e.gate_up_proj.shape[1] // 2
    x = torch.randn(37, lm.config.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ours = sparse_moe(x, block, spec, act=lambda gu: e.act_fn(gu[:, :inter]) * gu[:, inter:])
        if norm_topk_prob:
            for impl in ("grouped_mm", "eager"):
                model.set_experts_implementation(impl)
                assert torch.equal(ours, block(x[None])[0]), impl
            model.set_experts_implementation("grouped_mm")
            return
        probs = torch.softmax(x @ block.gate.weight.t(), dim=-1)
        w, ids = probs.topk(2, dim=-1)
        ref = torch.zeros_like(x)
        for t in range(x.shape[0]):
            for j in range(2):
                g, u = (x[t] @ e.gate_up_proj[ids[t, j]].t()).chunk(2)
                ref[t] += w[t, j] * (e.act_fn(g) * u) @ e.down_proj[ids[t, j]].t()
    torch.testing.assert_close(ours, ref)


def test_moe_models_capture_cuda_graphs_in_bf16_only():
    """The rule that keeps a MoE model out of CUDA graphs where torch's grouped GEMM syncs with the host (fp16 /
    fp32 on CUDA); dense models and bf16 MoE models keep their graphs, the CPU has none to capture."""
    from types import SimpleNamespace

    from mmpipe.shared.engine.model_runner import ModelRunner

    def runner(moe, device, dtype):
        return SimpleNamespace(decoder=SimpleNamespace(spec=SimpleNamespace(moe=moe)), device=torch.device(device),
                               dtype=dtype)

    capturable = ModelRunner._moe_capturable
    assert capturable(runner(object(), "cuda", torch.bfloat16))
    assert not capturable(runner(object(), "cuda", torch.float32)) and not capturable(runner(object(), "cuda",
                                                                                              torch.float16))
    assert capturable(runner(None, "cuda", torch.float32)) and capturable(runner(object(), "cpu", torch.float32))
