"""The compact ingest -> encoder pixel form (shared/models/pixel_wire.py): uint8 on the wire, finished on the
encoder's device, bit-identical to the full HF processor's float output for every family and modality that
has pixels; the float fallback where no compact form exists; refusals of payloads an encoder cannot finish."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from mmpipe.shared.cache.serde import pack_tensors
from mmpipe.shared.errors import InvalidInputError
from mmpipe.shared.models.base import ModelAdapter
from mmpipe.shared.models.pixel_wire import PIXEL_KEYS, PixelWire, wire_tensors
from mmpipe.shared.models.registry import load_adapter
from mmpipe.shared.types import MediaItem, ProcessedItem
from offline_helpers import tiny_model_dirs  # noqa: F401 (a fixture)

PIXEL_FAMILIES = {
    "llava": ("image",),
    "qwen2_vl": ("image", "video"),
    "qwen2_5_vl": ("image", "video"),
    "llava_onevision": ("image", "video"),
    "qwen2_5_omni": ("image", "video"),
    "llava_next": ("image",),
    "internvl": ("image",),
}
CASES = [(f, m) for f, mods in PIXEL_FAMILIES.items() for m in mods]
_ARG = {"image": "images", "video": "videos"}
_HASH = "0" * 64


def _images() -> list[Image.Image]:
    """Landscape, square, tall-and-odd: anyres padding, Qwen's smart resize and CLIP's crop all differ."""
    rng = np.random.default_rng(0)
    sizes = ((84, 112), (56, 56), (130, 61))
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in sizes]


def _videos() -> list[np.ndarray]:
    """4 frames, and 3 (Qwen pads an odd count with a copy of the last frame)."""
    rng = np.random.default_rng(1)
    return [rng.integers(0, 256, (n, h, w, 3), dtype=np.uint8) for n, h, w in ((4, 56, 84), (3, 70, 50))]


@pytest.fixture(scope="module")
def adapters(tiny_model_dirs):
    made: dict[str, ModelAdapter] = {}

    def get(family: str) -> ModelAdapter:
        if family not in made:
            made[family] = load_adapter(str(tiny_model_dirs[family]), dtype="float32", device="cpu")
        return made[family]

    return get


def _full(adapter: ModelAdapter, modality: str, data, **kw) -> dict[str, torch.Tensor]:
    """The untouched HF processor call (the oracle), as transformers' own generate would see it."""
    return adapter.processor(text=adapter.placeholder_token(modality), return_tensors="pt",
                             **{_ARG[modality]: [data]}, **kw)


def _fresh_processor(dirs, family: str):
    """A processor of its own, for tests that swap its image processor (the shared adapters keep theirs)."""
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(str(dirs[family]))


def _finished(adapter: ModelAdapter, p: ProcessedItem) -> torch.Tensor:
    """What `encode` hands the towers: the item's pixels on the adapter's device, in its dtype."""
    return adapter.pixel_wire.on_device(p.modality, [p], adapter.device, adapter.model.dtype)[0] \
        .tensors[PIXEL_KEYS[p.modality]]


def _item(modality: str, data) -> MediaItem:
    return MediaItem(modality=modality, data=data, content_hash=_HASH)


@pytest.mark.parametrize("family,modality", CASES)
def test_compact_then_finish_is_the_full_processor_bit_for_bit(family, modality, adapters):
    ad = adapters(family)
    key = PIXEL_KEYS[modality]
    for data in (_images() if modality == "image" else _videos()):
        p = ad.preprocess(_item(modality, data))
        full = _full(ad, modality, data)
        assert p.tensors[key].dtype == torch.uint8
        finished = _finished(ad, p)
        assert finished.dtype == torch.float32 and torch.equal(finished, full[key])
        for k, v in p.tensors.items():  # grids, image sizes, seconds per grid: untouched
            if k != key:
                assert torch.equal(v, full[k]), k
        assert p.meta["num_tokens"] == int((full["input_ids"][0] == ad.placeholder_id(modality)).sum())


@pytest.mark.parametrize("family,modality", [("qwen2_5_vl", "image"), ("llava_onevision", "image"),
                                             ("qwen2_vl", "video"), ("llava", "image"),
                                             ("llava_next", "image"), ("internvl", "image")])
def test_embedding_is_unchanged_by_the_wire_form(family, modality, adapters):
    """What the cache key promises: the compact item encodes to exactly the float item's embedding."""
    ad = adapters(family)
    data = _images()[0] if modality == "image" else _videos()[0]
    compact = ad.preprocess(_item(modality, data))
    full = _full(ad, modality, data)
    floats = ProcessedItem(modality=modality, key=_HASH, meta=dict(compact.meta),
                           tensors={k: full[k] for k in compact.tensors})
    a, b = ad.encode(modality, [compact])[0], ad.encode(modality, [floats])[0]
    assert torch.equal(a.tensor, b.tensor) and a.meta == b.meta


def test_a_batch_mixing_compact_and_float_items_keeps_order_and_values(adapters):
    ad = adapters("qwen2_vl")
    imgs = _images()
    compact = [ad.preprocess(_item("image", im)) for im in imgs]
    full = [_full(ad, "image", im)["pixel_values"] for im in imgs]
    mixed = [compact[0], ProcessedItem("image", _HASH, {"pixel_values": full[1]}), compact[2]]
    for batch in (mixed, compact):
        done = ad.pixel_wire.on_device("image", batch, ad.device, ad.model.dtype)
        assert all(torch.equal(d.tensors["pixel_values"], f) for d, f in zip(done, full, strict=True))
    assert ad.pixel_wire.on_device("image", [mixed[1]], ad.device, ad.model.dtype)[0] is mixed[1]


def test_qwen_image_at_real_sizes_travels_in_an_eighth_of_the_float_bytes(adapters, tiny_model_dirs):
    """Qwen2.5-VL's own image processor sizes (min 3136, max 12845056 pixels), a 448x448 image."""
    from transformers import Qwen2VLImageProcessor

    ad = adapters("qwen2_5_vl")
    proc = _fresh_processor(tiny_model_dirs, "qwen2_5_vl")
    proc.image_processor = Qwen2VLImageProcessor(size={"shortest_edge": 3136, "longest_edge": 12845056})
    real = type(ad)(ad.model, proc)
    img = Image.fromarray(np.random.default_rng(3).integers(0, 256, (448, 448, 3), dtype=np.uint8))
    p = real.preprocess(_item("image", img))
    full = _full(real, "image", img)
    assert tuple(full["pixel_values"].shape) == (1024, 1176) and tuple(p.tensors["pixel_values"].shape) == (1024, 588)
    assert torch.equal(_finished(real, p), full["pixel_values"])
    compact_bytes = len(pack_tensors(p.tensors, p.meta))
    float_bytes = len(pack_tensors({k: full[k] for k in p.tensors}, p.meta))
    assert compact_bytes < 1024 * 588 + 2048 and float_bytes > 1024 * 1176 * 4


def test_siglip_has_the_planes_form(adapters, tiny_model_dirs):
    from transformers import SiglipImageProcessor

    ad = adapters("llava")
    proc = _fresh_processor(tiny_model_dirs, "llava")
    proc.image_processor = SiglipImageProcessor(size={"height": 56, "width": 56})
    siglip = type(ad)(ad.model, proc)
    assert siglip.pixel_wire.form("image") is not None
    for img in _images():
        p = siglip.preprocess(_item("image", img))
        assert p.tensors["pixel_values"].dtype == torch.uint8
        assert torch.equal(_finished(siglip, p), _full(siglip, "image", img)["pixel_values"])


def test_pil_backend_falls_back_to_floats_and_refuses_uint8(adapters, tiny_model_dirs):
    from transformers import CLIPImageProcessorPil

    ad = adapters("llava")
    proc = _fresh_processor(tiny_model_dirs, "llava")
    cfg = {k: v for k, v in proc.image_processor.to_dict().items() if not k.startswith("image_processor_type")}
    proc.image_processor = CLIPImageProcessorPil(**cfg)
    pil = type(ad)(ad.model, proc)
    assert pil.pixel_wire.form("image") is None and "PIL" in pil.pixel_wire.reason("image")
    img = _images()[0]
    p = pil.preprocess(_item("image", img))
    assert p.tensors["pixel_values"].dtype == torch.float32
    assert torch.equal(p.tensors["pixel_values"], _full(pil, "image", img)["pixel_values"])
    u8 = {"pixel_values": torch.zeros(1, 3, 56, 56, dtype=torch.uint8)}
    with pytest.raises(InvalidInputError, match="no compact form for image"):
        pil.pixel_wire.check_payload("image", u8, torch.float32)
    with pytest.raises(InvalidInputError, match="no compact form for image"):
        pil.encode("image", [ProcessedItem("image", _HASH, u8, {"num_tokens": 17})])


def test_normalisation_set_at_call_time_keeps_the_float_path(tiny_model_dirs):
    kw = {"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}
    ad = load_adapter(str(tiny_model_dirs["qwen2_vl"]), dtype="float32", device="cpu", mm_processor_kwargs=kw)
    assert ad.pixel_wire.form("image") is None and "image_mean" in ad.pixel_wire.reason("image")
    assert ad.pixel_wire.form("video") is None
    img = _images()[0]
    p = ad.preprocess(_item("image", img))
    assert p.tensors["pixel_values"].dtype == torch.float32
    assert torch.equal(p.tensors["pixel_values"], _full(ad, "image", img, **kw)["pixel_values"])


def test_audio_has_no_compact_form_and_uint8_features_are_refused(adapters, tiny_model_dirs):
    from offline_helpers import make_audio

    ad = load_adapter(str(tiny_model_dirs["qwen2_audio"]), dtype="float32", device="cpu")
    p = ad.preprocess(MediaItem("audio", make_audio(), _HASH, meta={"sampling_rate": 16000}))
    assert p.tensors["input_features"].dtype == torch.float32
    ad.pixel_wire.check_payload("audio", p.tensors, torch.float32)
    bad = {**p.tensors, "input_features": p.tensors["input_features"].to(torch.uint8)}
    with pytest.raises(InvalidInputError, match="input_features must be floating point"):
        ad.pixel_wire.check_payload("audio", bad, torch.float32)


def test_encoder_refuses_a_uint8_payload_of_the_wrong_layout(adapters):
    wire = adapters("qwen2_5_vl").pixel_wire
    wire.check_payload("image", {"pixel_values": torch.zeros(16, 588, dtype=torch.uint8)}, torch.float32)
    wire.check_payload("image", {"pixel_values": torch.zeros(16, 1176, dtype=torch.uint8)}, torch.float32)
    with pytest.raises(InvalidInputError, match="qwen_patches layout"):
        wire.check_payload("image", {"pixel_values": torch.zeros(16, 1000, dtype=torch.uint8)}, torch.float32)
    with pytest.raises(InvalidInputError, match="planes layout"):
        adapters("llava").pixel_wire.check_payload(
            "image", {"pixel_values": torch.zeros(1, 4, 56, 56, dtype=torch.uint8)}, torch.float32)


def test_wire_dtype_narrows_only_floats_and_the_encoder_checks_it(adapters):
    from offline_helpers import make_audio

    ad = adapters("qwen2_5_omni")
    img = ad.preprocess(_item("image", _images()[0]))
    aud = ad.preprocess(MediaItem("audio", make_audio(), _HASH, meta={"sampling_rate": 16000}))
    sent = wire_tensors(img.tensors, torch.bfloat16)
    assert sent["pixel_values"].dtype == torch.uint8 and sent["image_grid_thw"].dtype == torch.int64
    feats = wire_tensors(aud.tensors, torch.bfloat16)
    assert feats["input_features"].dtype == torch.bfloat16
    assert wire_tensors(aud.tensors, None) is aud.tensors
    ad.pixel_wire.check_payload("audio", feats, torch.bfloat16)  # exact: the encoder casts to bf16 anyway
    with pytest.raises(InvalidInputError, match="narrower than this encoder's torch.float32"):
        ad.pixel_wire.check_payload("audio", feats, torch.float32)


def test_forms_are_derived_from_the_processor_not_the_wire(adapters):
    """Ingest and encoder each build the same forms from their own processor (no wire values)."""
    ad = adapters("qwen2_5_vl")
    again = PixelWire(ad.processor, ad.mm_processor_kwargs)
    for m in ("image", "video"):
        a, b = ad.pixel_wire.form(m), again.form(m)
        assert a is not None and (a.layout, a.patch, a.temporal) == (b.layout, b.patch, b.temporal) == \
            ("qwen_patches", 14, 2)
    assert adapters("llava_onevision").pixel_wire.form("video").layout == "planes"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("family,modality", CASES)
def test_finishing_on_cuda_matches_the_cpu_processor(family, modality, adapters):
    ad = adapters(family)
    key = PIXEL_KEYS[modality]
    data = _images()[0] if modality == "image" else _videos()[1]
    p = ad.preprocess(_item(modality, data))
    got = ad.pixel_wire.form(modality).finish([p.tensors[key]], "cuda", torch.float32)
    assert torch.equal(got.cpu(), _full(ad, modality, data)[key])
