"""Voxtral offline: clips of different lengths, one longer than a 30 s chunk (two chunks, 750 rows), several
clips in one prompt, a batch mixed with a text-only prompt, and preemption, against transformers'
`model.generate(**processor.apply_chat_template(...))` (the processor's only audio path, through mistral-common).

One-clip chat parity is in test_offline_parity.py (the family matrix), stage-only weights in test_stage_weights.py,
the served path in test_voxtral_served.py."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from offline_helpers import hf_chat_generate, oracle_model, tiny_model_dirs, wav_b64  # noqa: F401

from mmpipe import LLM
from mmpipe.shared.errors import UnsupportedError
from mmpipe.shared.models.tiny import VOXTRAL_TOKENS_PER_CHUNK
from mmpipe.shared.types import SamplingParams

TEXT = "What's that sound?"


def clip(seconds: float, freq: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * 16000)) / 16000
    return (0.3 * np.sin(2 * np.pi * freq * t) + 0.05 * rng.standard_normal(t.shape)).astype(np.float32)


CLIPS = [[clip(6.0, 440)], [], [clip(4.0, 900, 1), clip(35.0, 300, 2)]]
LENS = (8, 6, 7)


@pytest.fixture(scope="module")
def path(tiny_model_dirs):  # noqa: F811
    return tiny_model_dirs["voxtral"]


def _messages(clips: list) -> list[dict]:
    parts = [{"type": "input_audio", "input_audio": {"data": wav_b64(a), "format": "wav"}} for a in clips]
    return [{"role": "user", "content": parts + [{"type": "text", "text": TEXT}]}]


# the preemption batch: 387 + 11 + 387 prompt tokens fill 197 of 199 blocks of 4; their answers need 203
PRE_CLIPS = [CLIPS[0], [], [clip(5.0, 700, 3)]]


@pytest.fixture(scope="module")
def refs(path):
    return {id(cs): [hf_chat_generate(path, [*c, TEXT], max_new_tokens=n) for c, n in zip(cs, LENS)]
            for cs in (CLIPS, PRE_CLIPS)}


@pytest.mark.parametrize("clips, kw", [(CLIPS, {}), (PRE_CLIPS, {"kv_cache_blocks": 199, "block_size": 4})],
                         ids=["one-step", "preemption"])
def test_mixed_batch_matches_transformers(path, refs, clips, kw):
    llm = LLM(str(path), device="cpu", **kw)
    tok = llm.adapter.tokenizer
    prompts = [tok.apply_chat_template([{"role": "user", "content": [{"type": "audio"}] * len(c) + [
        {"type": "text", "text": TEXT}]}], add_generation_prompt=True, tokenize=False) for c in clips]
    data = [{"prompt": p, "multi_modal_data": {"audio": [(a, 16000) for a in c]}} if c else p
            for p, c in zip(prompts, clips)]
    outs = llm.generate(data, [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in LENS],
                        use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == refs[id(clips)]
    if kw:
        assert llm.engine.scheduler.num_preemptions > 0


def test_long_clip_is_two_chunks_in_mistral_commons_layout(path):
    llm = LLM(str(path), device="cpu")
    _, processor = oracle_model(str(path))
    out = llm.chat(_messages(CLIPS[2]), SamplingParams(temperature=0, max_tokens=1, ignore_eos=True),
                   use_tqdm=False)[0]
    parts = [{"type": "audio", "base64": wav_b64(a)} for a in CLIPS[2]] + [{"type": "text", "text": TEXT}]
    want = processor.apply_chat_template([{"role": "user", "content": parts}])["input_ids"][0].tolist()
    assert out.prompt_token_ids == want
    audio = processor.tokenizer.convert_tokens_to_ids("[AUDIO]")
    assert want.count(audio) == VOXTRAL_TOKENS_PER_CHUNK * (1 + 2)  # 4 s -> one chunk, 35 s -> two


def test_audio_embeds_are_refused(path):
    llm = LLM(str(path), device="cpu", enable_mm_embeds=True)
    with pytest.raises(UnsupportedError) as e:
        llm.generate({"prompt": "[INST][AUDIO]Describe.[/INST]", "multi_modal_data": {"audio": torch.zeros(1, 4, 64)}},
                     use_tqdm=False)
    assert e.value.param == "audio_embeds"


def test_chat_template_fallback(path):
    from mmpipe.shared.chat.templates import FALLBACK_TEMPLATES, apply_template

    llm = LLM(str(path), device="cpu")
    processor = llm.adapter.processor
    assert type(processor.tokenizer).__name__ == "TokenizersBackend"  # the HF files, not tekken.json
    msgs = [{"role": "user", "content": [{"type": "audio"}, {"type": "text", "text": "What?"}]},
            {"role": "assistant", "content": "A bird."}, {"role": "user", "content": "More?"}]
    got = apply_template(processor, FALLBACK_TEMPLATES["voxtral"], msgs)
    assert got == "<s>[INST][AUDIO]What?[/INST]A bird.</s>[INST]More?[/INST]"
    assert got == processor.tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
