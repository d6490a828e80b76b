"""Each GPU stage holds only its own weights: the encoder the towers, the generator the LM (issue 10).

For every tiny family: the "towers" model has no LM parameter off the meta device and the "lm" model no tower
parameter; every tensor a part holds (buffers included) is bit-identical to the full model's; the towers-only
embeddings equal the full model's; and the LM-only model, fed those embeddings, generates through the engine
the same tokens as the full model. Checkpoint layouts: the hub layout that save_pretrained writes (`visual.*`,
`model.layers.*`, `language_model.model.*`), transformers 5 module names, tied embeddings without `lm_head`,
Qwen3-VL-MoE's transposed hub layout of the fused experts, and a sharded checkpoint. No tensor a part does not
need is read: corrupted bytes and a deleted shard of the other part change nothing.
"""
from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from engine_helpers import make_audio, make_image, make_video, run_engine
from mmpipe.shared.engine import EngineConfig, LLMEngine
from mmpipe.shared.errors import ModelLoadError, UnsupportedError
from mmpipe.shared.inputs.assemble import build_engine_request
from mmpipe.shared.models.base import ModelAdapter
from mmpipe.shared.models.checkpoint import Checkpoint
from mmpipe.shared.models.partial import under
from mmpipe.shared.models.registry import held_weights, load_adapter
from mmpipe.shared.types import MediaItem, MMEmbedding, SamplingParams
from offline_helpers import FAMILY_MODALITIES, tiny_model_dirs  # noqa: F401 (tiny_model_dirs is a fixture)

FAMILIES = list(FAMILY_MODALITIES)
GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)


# --- helpers -------------------------------------------------------------------------------------------------
def _tensors(adapter: ModelAdapter) -> dict[str, torch.Tensor]:
    m = adapter.model
    return dict(m.named_parameters(remove_duplicate=False)) | dict(m.named_buffers())


def _held(adapter: ModelAdapter) -> dict[str, torch.Tensor]:
    return {n: t for n, t in _tensors(adapter).items() if t.device.type != "meta"}


def _assert_holds_exactly(part_adapter: ModelAdapter, full: ModelAdapter, part: str) -> None:
    """Everything under the part's modules is held and equals the full model; everything else is on meta."""
    mods = part_adapter.part_modules(part)
    full_t = _tensors(full)
    part_t = _tensors(part_adapter)
    assert part_t.keys() == full_t.keys()
    for name, t in part_t.items():
        if under(name, mods):
            assert t.device.type == "cpu", f"{name} of the {part} part is on {t.device}"
            assert t.dtype == full_t[name].dtype and torch.equal(t, full_t[name]), f"{name} differs from the full model"
        else:
            assert t.device.type == "meta", f"{name} is outside the {part} part but was materialised"


def _items(adapter: ModelAdapter, family: str) -> list:
    data = {"image": make_image(112, 84, seed=3), "video": make_video(4, 56, 84, seed=4),
            "audio": make_audio(1.0, seed=5)}
    return [adapter.preprocess(MediaItem(m, data[m], f"{i:064x}")) for i, m in enumerate(FAMILY_MODALITIES[family])]


def _encode(adapter: ModelAdapter, items: list) -> list[MMEmbedding]:
    return [e for it in items for e in adapter.encode(it.modality, [it])]


def _prompt_ids(adapter: ModelAdapter, family: str) -> list[int]:
    content = [{"type": m} for m in FAMILY_MODALITIES[family]] + [{"type": "text", "text": "Describe all of it."}]
    text = adapter.tokenizer.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                                 tokenize=False)
    return adapter.tokenizer(text, add_special_tokens=False).input_ids


def _generate(adapter: ModelAdapter, token_ids: list[int], embeds: list[MMEmbedding]) -> list[int]:
    req = build_engine_request(adapter, "r", token_ids, embeds, GREEDY)
    engine = LLMEngine(adapter.model, EngineConfig(device=str(adapter.device), dtype=adapter.model.dtype))
    return run_engine(engine, {0: [req]}).tokens["r"]


def _copy_model_dir(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _checkpoint_keys_of(model_dir: Path, adapter: ModelAdapter, part: str) -> set[str]:
    """The stored keys (as written in the file) that the part's parameters come from."""
    stored = Checkpoint(str(model_dir), adapter.model).stored
    return {where.key for name, where in stored.items() if under(name, adapter.part_modules(part))}


def _corrupt(path: Path, keys: set[str]) -> None:
    """Overwrite the bytes of `keys` in a safetensors file with 0xFF (NaN in fp32): the header stays valid."""
    raw = bytearray(path.read_bytes())
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    for key in keys:
        start, end = header[key]["data_offsets"]
        raw[8 + n + start:8 + n + end] = b"\xff" * (end - start)
    path.write_bytes(bytes(raw))


@pytest.fixture(scope="module")
def full_adapters(tiny_model_dirs):  # noqa: F811
    made: dict[str, ModelAdapter] = {}

    def get(family: str) -> ModelAdapter:
        if family not in made:
            made[family] = load_adapter(str(tiny_model_dirs[family]), device="cpu")
        return made[family]

    return get


# --- what each part holds --------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_each_part_holds_only_its_modules(family, tiny_model_dirs, full_adapters):  # noqa: F811
    full = full_adapters(family)
    towers = load_adapter(str(tiny_model_dirs[family]), device="cpu", part="towers")
    lm = load_adapter(str(tiny_model_dirs[family]), device="cpu", part="lm")
    _assert_holds_exactly(towers, full, "towers")
    _assert_holds_exactly(lm, full, "lm")
    # the decoder, embeddings and lm_head are meta in the towers model, every tower parameter in the lm model
    tm, lmm = towers.model, lm.model
    assert all(p.device.type == "meta" for n, p in tm.named_parameters() if under(n, towers.lm_modules))
    assert tm.lm_head.weight.device.type == "meta"
    assert all(p.device.type == "meta" for n, p in lmm.named_parameters() if under(n, lm.tower_modules))
    # the two parts together are the whole model, and each holds less than it
    assert held_weights(towers).bytes + held_weights(lm).bytes == held_weights(full).bytes
    assert 0 < held_weights(towers).bytes < held_weights(full).bytes
    # what the stages read off the adapter works on a partial model
    for a in (towers, lm):
        assert a.device == torch.device("cpu") and a.model.dtype == torch.float32
        assert a.model.config.to_dict() == full.model.config.to_dict()  # the cache key's model fingerprint
        assert a.model.generation_config.eos_token_id == full.model.generation_config.eos_token_id
        assert a.placeholder_ids() == full.placeholder_ids() and a.settings() == full.settings()
    assert str(held_weights(towers)).startswith("holds ") and "towers (" in str(held_weights(towers))


def test_bf16_part_keeps_dtypes(tiny_model_dirs):  # noqa: F811
    d = str(tiny_model_dirs["qwen2_5_vl"])
    full = load_adapter(d, device="cpu", dtype="bfloat16")
    for part in ("towers", "lm"):
        _assert_holds_exactly(load_adapter(d, device="cpu", dtype="bfloat16", part=part), full, part)


# --- the stages' work on their parts ------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_towers_encode_and_lm_generate_like_the_full_model(family, tiny_model_dirs, full_adapters):  # noqa: F811
    full = full_adapters(family)
    towers = load_adapter(str(tiny_model_dirs[family]), device="cpu", part="towers")
    lm = load_adapter(str(tiny_model_dirs[family]), device="cpu", part="lm")
    items = _items(towers, family)
    got, want = _encode(towers, items), _encode(full, items)
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g.tensor, w.tensor) and g.meta == w.meta
    ids = _prompt_ids(full, family)
    ref = _generate(full, ids, want)
    assert len(ref) == GREEDY.max_tokens
    assert _generate(lm, ids, got) == ref
    with pytest.raises(UnsupportedError, match="only the LM"):
        lm.encode(items[0].modality, items[:1])


# --- checkpoint layouts -------------------------------------------------------------------------------------
def test_save_pretrained_writes_the_old_hub_layout(tiny_model_dirs):  # noqa: F811
    """The layouts the other tests load from: hub key names, not transformers 5's module names."""
    with safe_open(str(tiny_model_dirs["qwen2_5_vl"] / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert any(k.startswith("visual.") for k in keys) and any(k.startswith("model.layers.") for k in keys)
    assert "lm_head.weight" in keys and not any(k.startswith("model.language_model.") for k in keys)
    with safe_open(str(tiny_model_dirs["llava"] / "model.safetensors"), "pt") as f:
        assert any(k.startswith("language_model.model.layers.") for k in f.keys())


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl", "qwen2_5_omni"])
def test_transformers5_module_names_load(family, tiny_model_dirs, full_adapters, tmp_path):  # noqa: F811
    """A checkpoint keyed by the model's own parameter names (what a plain state_dict save gives)."""
    full = full_adapters(family)
    d = _copy_model_dir(tiny_model_dirs[family], tmp_path / family)
    save_file({k: v.contiguous() for k, v in full.model.state_dict().items()}, str(d / "model.safetensors"))
    with safe_open(str(d / "model.safetensors"), "pt") as f:
        assert any(k.startswith("model.language_model.") for k in f.keys())
    for part in ("towers", "lm"):
        _assert_holds_exactly(load_adapter(str(d), device="cpu", part=part), full, part)


def test_tied_embeddings_without_lm_head(tiny_model_dirs, tmp_path):  # noqa: F811
    """Like Qwen2.5-VL-3B: tie_word_embeddings and no lm_head.weight stored; the LM part ties it."""
    d = _copy_model_dir(tiny_model_dirs["qwen2_5_vl"], tmp_path / "tied")
    cfg = json.loads((d / "config.json").read_text())
    cfg["tie_word_embeddings"] = True
    cfg.setdefault("text_config", {})["tie_word_embeddings"] = True
    (d / "config.json").write_text(json.dumps(cfg))
    with safe_open(str(d / "model.safetensors"), "pt") as f:
        sd = {k: f.get_tensor(k) for k in f.keys() if k != "lm_head.weight"}
    save_file(sd, str(d / "model.safetensors"))
    full = load_adapter(str(d), device="cpu")
    assert full.model.lm_head.weight is full.model.model.language_model.embed_tokens.weight
    lm = load_adapter(str(d), device="cpu", part="lm")
    assert lm.model.lm_head.weight is lm.model.model.language_model.embed_tokens.weight
    _assert_holds_exactly(lm, full, "lm")
    _assert_holds_exactly(load_adapter(str(d), device="cpu", part="towers"), full, "towers")
    ids = _prompt_ids(full, "qwen2_5_vl")
    embeds = _encode(full, _items(full, "qwen2_5_vl"))
    assert _generate(lm, ids, embeds) == _generate(full, ids, embeds)


def test_moe_experts_in_the_hub_layout_load_transposed(tiny_model_dirs, full_adapters, tmp_path):  # noqa: F811
    """Qwen3-VL-MoE hub checkpoints store the fused experts as (E, hidden, 2I) and (E, I, hidden); transformers 5
    transposes them on load (`Transpose(check_dims=True)`) and so does the LM part, which then generates the full
    model's tokens; the towers part reads none of them."""
    family = "qwen3_vl_moe"
    full = full_adapters(family)
    d = _copy_model_dir(tiny_model_dirs[family], tmp_path / family)
    with safe_open(str(d / "model.safetensors"), "pt") as f:
        sd = {k: f.get_tensor(k) for k in f.keys()}
    experts = [k for k in sd if k.endswith(("mlp.experts.gate_up_proj", "mlp.experts.down_proj"))]
    assert len(experts) == 4  # two MoE layers, the third is dense
    for k in experts:
        assert sd[k].shape[1] != sd[k].shape[2]
        sd[k] = sd[k].transpose(1, 2).contiguous()
    save_file(sd, str(d / "model.safetensors"))
    assert all(torch.equal(t, _tensors(full)[n]) for n, t in _tensors(load_adapter(str(d), device="cpu")).items())
    lm = load_adapter(str(d), device="cpu", part="lm")
    _assert_holds_exactly(lm, full, "lm")
    _assert_holds_exactly(load_adapter(str(d), device="cpu", part="towers"), full, "towers")
    ids, embeds = _prompt_ids(full, family), _encode(full, _items(full, family))
    assert _generate(lm, ids, embeds) == _generate(full, ids, embeds)


# --- nothing else is read ------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["qwen2_5_vl", "llava_onevision", "qwen2_5_omni"])
def test_tensors_of_the_other_part_are_never_read(family, tiny_model_dirs, full_adapters, tmp_path):  # noqa: F811
    """The other part's bytes are overwritten with NaNs: each part still loads, bit-identical, and works."""
    full = full_adapters(family)
    for part in ("towers", "lm"):
        d = _copy_model_dir(tiny_model_dirs[family], tmp_path / part)
        path = d / "model.safetensors"
        with safe_open(str(path), "pt") as f:
            all_keys = set(f.keys())
        needed = _checkpoint_keys_of(d, full, part)
        assert needed and needed < all_keys
        _corrupt(path, all_keys - needed)
        broken = load_adapter(str(d), device="cpu")  # the whole model does read them: the corruption is real
        assert any(not torch.isfinite(p).all() for p in broken.model.parameters())
        adapter = load_adapter(str(d), device="cpu", part=part)
        _assert_holds_exactly(adapter, full, part)
        items = _items(full, family)
        if part == "towers":
            assert all(torch.equal(g.tensor, w.tensor) for g, w in zip(_encode(adapter, items), _encode(full, items)))
        else:
            ids, embeds = _prompt_ids(full, family), _encode(full, items)
            assert _generate(adapter, ids, embeds) == _generate(full, ids, embeds)


def test_sharded_checkpoint_opens_only_the_parts_shard(tiny_model_dirs, full_adapters, tmp_path):  # noqa: F811
    """One shard per part plus the index: with the other part's shard deleted, each part still loads."""
    family = "qwen2_vl"
    full = full_adapters(family)
    src = tiny_model_dirs[family]
    tower_keys = _checkpoint_keys_of(src, full, "towers")
    with safe_open(str(src / "model.safetensors"), "pt") as f:
        sd = {k: f.get_tensor(k) for k in f.keys()}
    shards = {"towers": "model-00001-of-00002.safetensors", "lm": "model-00002-of-00002.safetensors"}
    for part, other in (("towers", "lm"), ("lm", "towers")):
        d = _copy_model_dir(src, tmp_path / part)
        (d / "model.safetensors").unlink()
        weight_map = {k: shards["towers" if k in tower_keys else "lm"] for k in sd}
        for shard in shards.values():
            save_file({k: v for k, v in sd.items() if weight_map[k] == shard}, str(d / shard))
        (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
        (d / shards[other]).unlink()
        _assert_holds_exactly(load_adapter(str(d), device="cpu", part=part), full, part)
        with pytest.raises(ModelLoadError, match="missing"):
            load_adapter(str(d), device="cpu", part=other)


# --- errors ----------------------------------------------------------------------------------------------
def test_missing_needed_key_is_a_clear_error(tiny_model_dirs, tmp_path):  # noqa: F811
    d = _copy_model_dir(tiny_model_dirs["llava"], tmp_path / "llava")
    with safe_open(str(d / "model.safetensors"), "pt") as f:
        sd = {k: f.get_tensor(k) for k in f.keys()}
    drop = "language_model.model.layers.0.mlp.up_proj.weight"
    assert drop in sd
    save_file({k: v for k, v in sd.items() if k != drop}, str(d / "model.safetensors"))
    with pytest.raises(ModelLoadError, match=r"no tensor for model\.language_model\.layers\.0\.mlp\.up_proj\.weight"):
        load_adapter(str(d), device="cpu", part="lm")
    towers = load_adapter(str(d), device="cpu", part="towers")  # the towers never needed it
    assert towers.model.model.multi_modal_projector.linear_1.weight.device.type == "cpu"


def test_unknown_part_and_uncovered_parameters(tiny_model_dirs):  # noqa: F811
    d = str(tiny_model_dirs["llava"])
    with pytest.raises(UnsupportedError, match="unknown model part"):
        load_adapter(d, device="cpu", part="vision")
    from transformers import AutoConfig, AutoModelForImageTextToText

    from mmpipe.shared.models.llava import LlavaAdapter
    from mmpipe.shared.models.partial import load_part

    # a declaration that forgets the projector: a load error, not an encoder serving without it
    with torch.device("meta"):
        skeleton = AutoModelForImageTextToText.from_config(AutoConfig.from_pretrained(d))
    parts = {"towers": ("model.vision_tower",), "lm": LlavaAdapter.lm_modules}
    with pytest.raises(ModelLoadError, match="multi_modal_projector"):
        load_part(d, skeleton, parts["towers"], parts, torch.device("cpu"))


# --- a full Qwen2.5-Omni checkpoint (thinker + talker + token2wav) is served as its thinker -------------------------
def test_full_omni_checkpoint_serves_the_thinker_and_never_opens_the_talker(tiny_model_dirs, tmp_path):  # noqa: F811
    """The talker's and token2wav's tensors go to a shard of their own, which is then deleted: the whole thinker
    and each stage's part of it still load, bit-identical to transformers' own full model's thinker, and
    generate its tokens; the same checkpoint with the shard in place loads in transformers."""
    from mmpipe.shared.models.qwen2_5_omni import Qwen25OmniThinkerAdapter
    from mmpipe.shared.models.tiny import load_tiny_model

    src = tiny_model_dirs["qwen2_5_omni_full"]
    thinker, processor = load_tiny_model(src)  # Qwen2_5OmniForConditionalGeneration.from_pretrained(...).thinker
    oracle = Qwen25OmniThinkerAdapter(thinker, processor)
    with safe_open(str(src / "model.safetensors"), "pt") as f:
        sd = {k: f.get_tensor(k) for k in f.keys()}
    rest = {k for k in sd if not k.startswith("thinker.")}
    assert any(k.startswith("talker.") for k in rest) and any(k.startswith("token2wav.") for k in rest)
    d = _copy_model_dir(src, tmp_path / "omni")
    (d / "model.safetensors").unlink()
    shards = {"thinker": "model-00001-of-00002.safetensors", "rest": "model-00002-of-00002.safetensors"}
    weight_map = {k: shards["rest" if k in rest else "thinker"] for k in sd}
    for shard in shards.values():
        save_file({k: v for k, v in sd.items() if weight_map[k] == shard}, str(d / shard))
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (d / shards["rest"]).unlink()

    full = load_adapter(str(d), device="cpu")
    assert full.family == "qwen2_5_omni" and type(full.model) is type(thinker)
    towers = load_adapter(str(d), device="cpu", part="towers")
    lm = load_adapter(str(d), device="cpu", part="lm")
    _assert_holds_exactly(towers, oracle, "towers")
    _assert_holds_exactly(lm, oracle, "lm")
    assert all(torch.equal(t, _tensors(oracle)[n]) for n, t in _tensors(full).items())
    assert held_weights(towers).bytes + held_weights(lm).bytes == held_weights(full).bytes
    items = _items(towers, "qwen2_5_omni")
    got, want = _encode(towers, items), _encode(oracle, items)
    assert all(torch.equal(g.tensor, w.tensor) and g.meta == w.meta for g, w in zip(got, want, strict=True))
    ids = _prompt_ids(oracle, "qwen2_5_omni")
    ref = _generate(oracle, ids, want)
    assert len(ref) == GREEDY.max_tokens and _generate(lm, ids, got) == ref
    # what ingest and the gateway load (no weights) names the same family and placeholders
    from mmpipe.services.gateway.model_info import load_model_info
    from mmpipe.shared.models.light import load_preprocess_adapter

    light = load_preprocess_adapter(str(d))
    assert light.family == "qwen2_5_omni" and light.placeholder_ids() == oracle.placeholder_ids()
    assert all(p.device.type == "meta" for p in light.model.parameters())
    info = load_model_info(str(d))
    assert info.family == "qwen2_5_omni" and info.placeholder_ids == oracle.placeholder_ids()
