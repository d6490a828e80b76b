"""Our tower forwards (shared/models/towers/) give transformers' embeddings: CPU fp32, tiny random models.

The Qwen vision tower against `get_image_features` / `get_video_features` for one image, a batch of images of
different sizes (partial windows at the edges, so windows of several lengths and a reordered full-attention
layer), videos, bf16, and the compiled path; the Omni audio encoder against `get_audio_features`; the adapters'
batched encode against one HF call per item. Greedy token identity end to end is tests/test_offline_parity.py.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mmpipe.shared.models.towers.compile_config import ENV_VAR, compile_towers_enabled
from mmpipe.shared.models.towers.cuda_graphs import GraphCache
from mmpipe.shared.models.towers.graph_chunks import graph_chunks
from mmpipe.shared.models.towers.omni_audio import OmniAudioTower, find_audio_tower
from mmpipe.shared.models.towers.qwen_vision import QwenVisionTower, build_layout, find_visual
from mmpipe.shared.models.towers.varlen import VarlenPlan, varlen_sdpa

QWEN = ("qwen2_vl", "qwen2_5_vl", "qwen2_5_omni")
ONE = [(1, 8, 8)]
# tiny windows are 2x2 merged units (window_size 56 / merge 2 / patch 14): these grids cut windows at the right
# and bottom edges (3x5 and 7x2 units), one fits exactly, one is a single unit
MIXED = [(1, 6, 10), (1, 14, 4), (1, 8, 8), (1, 2, 2)]
VIDEOS = [(3, 6, 10), (2, 4, 4)]
EXACT = dict(rtol=0.0, atol=1e-6)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from mmpipe.shared.models.tiny import build_tiny_model, load_tiny_model

    root = tmp_path_factory.mktemp("towers")
    cache: dict[str, tuple] = {}

    def get(family: str):
        if family not in cache:
            path = build_tiny_model(family, root / family)
            cache[family] = (path, *load_tiny_model(path))
        return cache[family]

    return get


def _pixels(visual, grids, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    cfg = visual.config
    width = cfg.in_channels * cfg.temporal_patch_size * cfg.patch_size ** 2
    g = torch.Generator().manual_seed(seed)
    return torch.randn(sum(t * h * w for t, h, w in grids), width, generator=g).to(dtype)


@torch.inference_mode()
def _hf(model, pixels, grids, video: bool) -> torch.Tensor:
    g = torch.tensor(grids, device=pixels.device)
    out = (model.get_video_features(pixel_values_videos=pixels, video_grid_thw=g) if video
           else model.get_image_features(pixel_values=pixels, image_grid_thw=g))
    return torch.cat(out.pooler_output, dim=0)


# ---- the Qwen vision tower ------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", QWEN)
@pytest.mark.parametrize("grids,video", [(ONE, False), (MIXED, False), (VIDEOS, True)], ids=["one", "mixed", "video"])
def test_vision_tower_matches_transformers(tiny, family, grids, video):
    _, model, _ = tiny(family)
    visual = find_visual(model)
    tower = QwenVisionTower(visual, compile=False)
    px = _pixels(visual, grids)
    ours = tower(px, grids)
    torch.testing.assert_close(ours, _hf(model, px, grids, video), **EXACT)
    assert [r.shape[0] for r in tower.split(ours, grids)] == [t * h * w // 4 for t, h, w in grids]


def test_graph_chunks_cut_each_grid_into_power_of_two_pieces():
    a, b = (1, 8, 8), (1, 4, 4)
    rows = lambda g: g[0] * g[1] * g[2]  # noqa: E731
    assert graph_chunks([a] * 11, rows, 16 * 64) == [list(range(8)), [8, 9], [10]]
    # grouped by grid in first-appearance order; interleaved items keep their indices
    assert graph_chunks([a, b, a, b, a], rows, 16 * 64) == [[0, 2], [4], [1, 3]]
    # the row cap bounds a piece (64 rows each, 200 allowed: pieces of at most 2)
    assert graph_chunks([a] * 5, rows, 200) == [[0, 1], [2, 3], [4]]
    # an item over the cap alone is a piece of one (the graph cache runs it eagerly)
    assert graph_chunks([a, a], rows, 10) == [[0], [1]]


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_tower_run_as_graph_pieces_equals_the_whole_batch(tiny, family):
    """The pieces path (what CUDA runs) on the CPU: a GraphCache runs CPU tensors as they are, so this checks
    the cut and the reassembly into processor order against the one-batch forward and transformers."""
    _, model, _ = tiny(family)
    visual = find_visual(model)
    tower = QwenVisionTower(visual, compile=False)
    grids = [(1, 8, 8), (1, 6, 10), (1, 8, 8), (1, 8, 8), (1, 6, 10), (1, 2, 2)]
    px = _pixels(visual, grids)
    whole = tower(px, grids)
    tower.graphs = GraphCache(max_rows=4 * 64)
    pieces = tower(px, grids)
    torch.testing.assert_close(pieces, whole, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(pieces, _hf(model, px, grids, False), **EXACT)


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen2_5_omni"])
def test_the_mixed_batch_exercises_windows(tiny, family):
    """The comparison above proves something: layer 0 is windowed, windows of several lengths run as separate
    groups, the full-attention layer reorders its rows, and the output order is restored."""
    _, model, _ = tiny(family)
    visual = find_visual(model)
    assert visual.config.fullatt_block_indexes == [1] and len(visual.blocks) == 2
    tower = QwenVisionTower(visual, compile=False)
    lay = build_layout(MIXED, tower.merge, tower.window_units)
    assert tower.window_units == 2
    assert sorted({length for length, _ in lay.window_plan.groups}) == [4, 8, 16]  # corner, edge, whole (rows)
    assert lay.window_plan.gather is None and lay.full_plan.gather is not None
    assert lay.unit_restore is not None
    assert len(lay.full_plan.groups) == 4  # four frame sizes


def test_equal_images_need_no_reordering():
    """A batch of 448 px images in the 3B tower's geometry (32x32 patches, windows of 4x4 units): transformers'
    window permutation only, every window in one group, every frame in one group, no gathers."""
    lay = build_layout([(1, 32, 32)] * 3, merge=2, window_units=4)
    assert lay.window_plan.groups == ((64, 48),) and lay.full_plan.groups == ((1024, 3),)
    assert lay.window_plan.gather is None and lay.full_plan.gather is None
    assert lay.token_order is not None and lay.unit_restore is not None
    # transformers' own window index for the same grids
    from transformers.vision_utils import get_vision_window_index

    win, _ = get_vision_window_index(torch.tensor([[1, 32, 32]] * 3), spatial_merge_size=2, window_size=112,
                                     patch_size=14)
    assert torch.equal(lay.token_order.view(-1, 4)[:, 0] // 4, win)


def test_qwen2_vl_sorts_frames_by_length():
    lay = build_layout([(1, 4, 4), (2, 6, 6), (1, 4, 4)], merge=2, window_units=None)
    assert lay.window_plan is None
    assert lay.full_plan.groups == ((36, 2), (16, 2)) and lay.full_plan.gather is None
    assert lay.token_order is not None and torch.equal(lay.token_order[:72], torch.arange(16, 88))


@pytest.mark.parametrize("family", QWEN)
def test_vision_tower_bf16_matches_transformers(tiny, family):
    path, _, _ = tiny(family)
    from mmpipe.shared.models.tiny import read_tiny_info
    from transformers import AutoModelForImageTextToText, AutoModelForMultimodalLM

    auto = AutoModelForMultimodalLM if read_tiny_info(path)["loader"] == "multimodal_lm" else AutoModelForImageTextToText
    model = auto.from_pretrained(path, dtype=torch.bfloat16).eval()
    visual = find_visual(model)
    px = _pixels(visual, MIXED, dtype=torch.bfloat16)
    ours = QwenVisionTower(visual, compile=False)(px, MIXED)
    assert ours.dtype == torch.bfloat16
    torch.testing.assert_close(ours, _hf(model, px, MIXED, False), **EXACT)


@pytest.mark.parametrize("family", QWEN)
def test_compiled_vision_tower_matches_transformers(tiny, family):
    """The compiled path traces as one graph per function (fullgraph) and serves every batch shape without
    falling back; aot_eager keeps CI fast (inductor runs the same graphs on CUDA)."""
    _, model, _ = tiny(family)
    visual = find_visual(model)
    tower = QwenVisionTower(visual, compile=True, compile_backend="aot_eager")
    for grids, video in ((ONE, False), (MIXED, False), (VIDEOS, True)):
        px = _pixels(visual, grids, seed=1)
        torch.testing.assert_close(tower(px, grids), _hf(model, px, grids, video), rtol=1e-5, atol=1e-5)
    assert tower.ops.compiled, "the compiled path fell back to eager"


def test_tower_is_built_once_per_module(tiny, monkeypatch):
    _, model, _ = tiny("qwen2_5_vl")
    visual = find_visual(model)
    monkeypatch.delenv(ENV_VAR, raising=False)
    a = QwenVisionTower.of(visual)
    assert a is QwenVisionTower.of(visual) and not a.compile  # CPU: eager by default
    assert QwenVisionTower.of(visual, compile=True) is not a


def test_bad_grids_are_refused(tiny):
    _, model, _ = tiny("qwen2_5_vl")
    tower = QwenVisionTower(find_visual(model), compile=False)
    with pytest.raises(ValueError, match="merge size"):
        tower(torch.zeros(15, 1176), [(1, 3, 5)])
    with pytest.raises(ValueError, match="rows"):
        tower(torch.zeros(10, 1176), [(1, 4, 4)])


# ---- the Omni audio encoder --------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", [None, "aot_eager"], ids=["eager", "compiled"])
def test_omni_audio_tower_matches_transformers(tiny, backend):
    _, model, _ = tiny("qwen2_5_omni")
    enc = find_audio_tower(model)
    assert enc.n_window == 50  # chunks of 100 mel frames: these clips give full chunks, tails of 37, 1, 50, 99
    tower = OmniAudioTower(enc, compile=backend is not None, compile_backend=backend or "inductor")
    lens = [137, 200, 1, 150, 199]
    feats = torch.randn(len(lens), enc.num_mel_bins, 200, generator=torch.Generator().manual_seed(3))
    mask = (torch.arange(200)[None, :] < torch.tensor(lens)[:, None]).long()
    with torch.inference_mode():
        ref = model.get_audio_features(feats, mask).last_hidden_state
        ours = tower(feats.permute(0, 2, 1)[mask.bool()].permute(1, 0), lens)
    tol = EXACT if backend is None else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours, ref, **tol)
    assert ours.shape[0] == sum(tower.output_lengths(lens))
    if backend:
        assert tower.ops.compiled


# ---- through the adapters ----------------------------------------------------------------------------------------
def _adapter(tiny, family: str):
    from mmpipe.shared.models.registry import adapter_class_for

    path, model, processor = tiny(family)
    return adapter_class_for(model.config.model_type)(model, processor)


def _images(sizes):
    from PIL import Image

    rng = np.random.default_rng(5)
    return [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for w, h in sizes]


@pytest.mark.parametrize("family", QWEN + ("llava_onevision",))
def test_adapter_batch_of_different_sizes_equals_one_hf_call_per_item(tiny, family):
    from mmpipe.shared.types import MediaItem

    ad = _adapter(tiny, family)
    sizes = [(112, 84), (56, 56), (84, 112), (112, 56), (70, 98)]
    items = [ad.preprocess(MediaItem(modality="image", data=im, content_hash=str(i)))
             for i, im in enumerate(_images(sizes))]
    got = ad.encode("image", items)
    model, proc = ad.model, ad.processor
    for emb, im in zip(got, _images(sizes)):
        inputs = proc(text=ad.placeholder_token("image"), images=[im], return_tensors="pt", **ad.mm_processor_kwargs)
        with torch.inference_mode():
            if family == "llava_onevision":
                out = model.get_image_features(pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"],
                                               batch_num_images=torch.tensor([1]))
            else:
                out = model.get_image_features(pixel_values=inputs["pixel_values"],
                                               image_grid_thw=inputs["image_grid_thw"])
        ref = torch.cat([t.reshape(-1, t.shape[-1]) for t in out.pooler_output])
        torch.testing.assert_close(emb.tensor, ref, rtol=1e-5, atol=1e-5)
    if family == "llava_onevision":
        assert len({it.tensors["pixel_values"].shape[1] for it in items}) > 1  # different tile counts, one call


def test_omni_adapter_audio_batch(tiny):
    from mmpipe.shared.types import MediaItem

    ad = _adapter(tiny, "qwen2_5_omni")
    rng = np.random.default_rng(7)
    clips = [rng.standard_normal(int(s * 16000)).astype(np.float32) * 0.1 for s in (0.5, 1.0, 1.7)]
    items = [ad.preprocess(MediaItem(modality="audio", data=c, content_hash=str(i))) for i, c in enumerate(clips)]
    got = ad.encode("audio", items)
    with torch.inference_mode():  # transformers on the same batch: the same numbers
        batch = ad.model.get_audio_features(torch.cat([it.tensors["input_features"] for it in items]),
                                            torch.cat([it.tensors["feature_attention_mask"] for it in items]))
    torch.testing.assert_close(torch.cat([e.tensor for e in got]), batch.last_hidden_state, **EXACT)
    for emb, it in zip(got, items):  # one call per clip: float rounding of a different conv batch only
        with torch.inference_mode():
            ref = ad.model.get_audio_features(it.tensors["input_features"],
                                              it.tensors["feature_attention_mask"]).last_hidden_state
        torch.testing.assert_close(emb.tensor, ref, rtol=1e-5, atol=1e-5)


# ---- pieces ------------------------------------------------------------------------------------------------------
def test_varlen_sdpa_equals_one_call_per_segment():
    g = torch.Generator().manual_seed(0)
    lens = [5, 3, 5, 1, 3, 5]
    T, H, D = sum(lens), 2, 8
    q, k, v = (torch.randn(T, H, D, generator=g) for _ in range(3))
    starts = np.cumsum([0] + lens[:-1])
    plan, rows = VarlenPlan.build([np.arange(s, s + n) for s, n in zip(starts, lens)], T)
    assert plan.groups == ((5, 3), (3, 2), (1, 1)) and plan.gather is not None
    out = varlen_sdpa(q, k, v, plan, scale=D ** -0.5)
    for s, n in zip(starts, lens):
        ref = F.scaled_dot_product_attention(*(t[s:s + n].transpose(0, 1)[None] for t in (q, k, v)), scale=D ** -0.5)
        torch.testing.assert_close(out[s:s + n], ref[0].transpose(0, 1).reshape(n, H * D), **EXACT)
    sorted_plan, _ = VarlenPlan.build([np.arange(0, 4), np.arange(4, 8), np.arange(8, 10)], 10)
    assert sorted_plan.gather is None and sorted_plan.groups == ((4, 2), (2, 1))
    with pytest.raises(ValueError, match="cover"):
        VarlenPlan.build([np.arange(3)], 4)


def test_compile_switch(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert compile_towers_enabled("cuda") and not compile_towers_enabled("cpu")
    monkeypatch.setenv(ENV_VAR, "0")
    assert not compile_towers_enabled("cuda")
    assert compile_towers_enabled("cuda", override=True)
    monkeypatch.setenv(ENV_VAR, "1")
    assert compile_towers_enabled("cpu")
    monkeypatch.setenv(ENV_VAR, "sometimes")
    with pytest.raises(ValueError, match=ENV_VAR):
        compile_towers_enabled("cuda")


# ---- the GPU benchmark's CPU smoke mode ---------------------------------------------------------------------------
def test_tower_bench_smoke(tiny, tmp_path):
    """bench/tower_bench.py end to end on the CPU with a small tower (so the GPU script is not broken)."""
    import importlib.util
    import json
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("tower_bench", Path(__file__).parents[1] / "bench" / "tower_bench.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    path, _, _ = tiny("qwen2_5_vl")
    out = tmp_path / "smoke"
    bench.main(["--device", "cpu", "--small", "--model", str(path), "--compile-backend", "aot_eager",
                "--batches", "1", "--iters", "1", "--min-s", "0", "--warmup", "0", "--out", str(out)])
    res = json.loads(out.with_suffix(".json").read_text())
    assert {p["method"] for p in res["points"]} == {"transformers", "ours_eager", "ours_compiled"}
    eager = [c for c in res["checks"] if c["method"] == "ours_eager"]
    assert len(eager) == 2 and all(c["identical"] and c["repeat_identical"] for c in eager)
    assert all(c["max_abs_diff"] < 1e-5 for c in res["checks"] if c["method"] == "ours_compiled")
    assert res["config"]["depth"] == 4 and res["gflop_per_image"] > 0
    assert "| ours_compiled |" in out.with_suffix(".md").read_text()


# ---- CUDA (skipped without a GPU: `make test-gpu`) -----------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_tower_eager_exact_compiled_and_graphs_close(tiny):
    from transformers import AutoModelForImageTextToText

    path, _, _ = tiny("qwen2_5_vl")
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.bfloat16).to("cuda").eval()
    visual = find_visual(model)
    eager = QwenVisionTower(visual, compile=False)
    fast = QwenVisionTower(visual, compile=True)
    assert eager.graphs is None and fast.graphs is not None
    for grids in (ONE, MIXED):
        px = _pixels(visual, grids, dtype=torch.bfloat16).cuda()
        ref = _hf(model, px, grids, False)
        torch.testing.assert_close(eager(px, grids), ref, rtol=0, atol=0)
        runs = [fast(px, grids) for _ in range(3)]  # plain, captured, replayed
        torch.testing.assert_close(runs[0], ref, rtol=2e-2, atol=2e-2)
        assert torch.equal(runs[1], runs[0]) and torch.equal(runs[2], runs[0])
    # ONE is one graph; MIXED (four different grids) runs as four one-item pieces, ONE's grid among them
    assert len(fast.graphs) == 4 and fast.ops.compiled and fast.graphs.enabled
