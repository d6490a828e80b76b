"""The compact wire form of processed pixels: uint8 after the processor's geometry, normalised on the encoder.

In transformers 5 the torchvision-backend image and video processors resize, crop, pad and tile uint8 tensors,
then run ONE float step, `rescale_and_normalize` (float32), then only move values around (Qwen's patchify and
its temporal copies, stacking). Called with `do_rescale=False, do_normalize=False` such a processor returns the
same geometry as uint8, and its own `rescale_and_normalize` applied afterwards, on any device, gives exactly
the tensors of the full call: the same function on the same values (tests/test_pixel_wire.py checks every
family and modality bit for bit). So the ingest -> encoder hop and the encoder's host -> device copy carry
1 byte per value instead of 4, and Qwen images, whose patches hold two identical temporal copies, send one.

    ingest  (ModelAdapter.preprocess): `processor_kwargs` adds the two switches where the processor has a
            compact form; `compact` folds Qwen's duplicate temporal copies (and finishes on the CPU the rare
            input that came back as float, so the item is exact either way).
    encoder (ModelAdapter.encode): `on_device` / `PixelForm.finish` move the uint8 to the device FIRST,
            normalise there, then cast to the tower dtype, before any tower reads the items (so it holds for
            every adapter, whether it gathers tensors through `_cat` or itself). `check_payload` (the encoder
            service, before batching) refuses what this encoder cannot finish.

What remains after the uint8 stage travels nowhere: it depends only on the processor config (rescale factor,
mean and std of the sub-processor; the layout from its class; Qwen's patch and temporal sizes), and the
encoder loads the same model, so `PixelForm` is derived on each side from its own processor and no wire value
is trusted. The wire marks the compact form by dtype alone (uint8 under a pixel key); a Qwen row of C*P*P
instead of C*T*P*P values says the temporal copies were folded.

Processors without a compact form keep today's float path, and the encoder refuses uint8 pixels for them:
  - any class but the torchvision-backend CLIP, SigLIP, LLaVA-OneVision (image, video), LLaVA-NeXT and
    GOT-OCR2 (InternVL's tiles) image and Qwen2-VL (image,
    video; also Qwen2.5-VL's and the Omni thinker's) processors, exact class: a subclass or remote code may
    add float work after the normalisation. PIL-backend processors (`*Pil`) rescale in float64 numpy, which
    a float32 device op does not reproduce bit for bit;
  - CLIP / SigLIP with `do_pad`: their `_preprocess` pads after normalising (zeros of the normalised space),
    which uint8 zeros normalised later are not. OneVision pads its anyres canvas in uint8 before normalising
    (exact) and pads only across items of one call, and ingest sends one item per call (so does LLaVA-NeXT,
    whose tile padding comes after the normalisation, but across the items of one call only);
  - rescale / normalise (or Qwen patch size) settings given at call time through `mm_processor_kwargs` or the
    processor's own defaults: the remaining step must follow from the sub-processor's config alone;
  - a processor that neither rescales nor normalises: there is nothing to move.
Audio features (Whisper log-mel) are computed in float from the waveform and have no integer stage: no
compact form. Float payloads may be cast to `--wire-dtype` (`wire_tensors`, one owner for the rule), and the
encoder refuses a float payload narrower than its tower dtype: its embedding would differ from the one the
cache key names.

Owns: the form of processed media tensors between the processor and the towers. Must not: change what the
towers see, know about gRPC, the cache or the model's weights.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch

from mmpipe.shared.errors import InvalidInputError
from mmpipe.shared.types import ProcessedItem

# The processor output that holds pixels, per modality.
PIXEL_KEYS: dict[str, str] = {"image": "pixel_values", "video": "pixel_values_videos"}
# Float tensors `--wire-dtype` may narrow (the float fallback and audio features).
FLOAT_WIRE_KEYS: tuple[str, ...] = ("pixel_values", "pixel_values_videos", "input_features")

_SUB = {"image": "image_processor", "video": "video_processor"}
_CALL_KWARGS = {"image": "images_kwargs", "video": "videos_kwargs"}
_NORM_KEYS = ("do_rescale", "rescale_factor", "do_normalize", "image_mean", "image_std")
_TF = "transformers.models."
_CLIP_LIKE = frozenset({f"{_TF}clip.image_processing_clip.CLIPImageProcessor",
                        f"{_TF}siglip.image_processing_siglip.SiglipImageProcessor"})
_PLANES = _CLIP_LIKE | {f"{_TF}llava_onevision.image_processing_llava_onevision.LlavaOnevisionImageProcessor",
                        f"{_TF}llava_onevision.video_processing_llava_onevision.LlavaOnevisionVideoProcessor",
                        f"{_TF}llava_next.image_processing_llava_next.LlavaNextImageProcessor",
                        f"{_TF}got_ocr2.image_processing_got_ocr2.GotOcr2ImageProcessor"}
_QWEN_PATCHES = frozenset({f"{_TF}qwen2_vl.image_processing_qwen2_vl.Qwen2VLImageProcessor",
                           f"{_TF}qwen2_vl.video_processing_qwen2_vl.Qwen2VLVideoProcessor"})


@dataclass(frozen=True)
class PixelForm:
    """What is left of one sub-processor's work after its uint8 stage.

    layout "planes": (..., C, H, W), channels at dim -3 (CLIP, SigLIP, OneVision tiles and frames);
    layout "qwen_patches": (N, C*T*P*P) rows, channel-major, viewed as (N, C, T*P, P) to normalise.
    """

    processor: Any  # the image or video sub-processor: its config and its own rescale_and_normalize
    layout: str
    channels: int = 3
    patch: int = 0
    temporal: int = 1

    @property
    def folded_width(self) -> int:
        """Row width of a Qwen row whose T identical temporal copies travel once."""
        return self.channels * self.patch * self.patch

    @property
    def width(self) -> int:
        return self.folded_width * self.temporal

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        """The processor's own float step, on x's device ((..., C, H, W) views; float32 out)."""
        p = self.processor
        return p.rescale_and_normalize(x, p.do_rescale, p.rescale_factor, p.do_normalize,
                                       _hashable(p.image_mean), _hashable(p.image_std))

    def check(self, t: torch.Tensor, key: str) -> None:
        """Refuse a uint8 tensor that is not this processor's layout (before any device work)."""
        if self.layout == "planes":
            ok = t.ndim >= 4 and t.shape[-3] == self.channels
        else:
            ok = t.ndim == 2 and t.shape[1] in (self.width, self.folded_width)
        if not ok:
            raise InvalidInputError(
                f"uint8 {key} of shape {tuple(t.shape)} is not the {self.layout} layout of this encoder's "
                f"{type(self.processor).__name__}", param="tensors")

    def fold(self, t: torch.Tensor) -> torch.Tensor:
        """Ingest: a Qwen uint8 tensor with its identical temporal copies kept once (unchanged otherwise)."""
        if self.layout != "qwen_patches" or self.temporal == 1 or t.ndim != 2 or t.shape[1] != self.width:
            return t
        n, pp = t.shape[0], self.patch * self.patch
        v = t.view(n, self.channels, self.temporal, pp)
        # Compared slice against slice, 4 bytes at a time where rows allow: torch.equal on a stride-0 expand
        # takes a path ~50x slower, and on uint8 elements ~3x slower than on int32 words.
        words = pp % 4 == 0 and t.is_contiguous() and t.storage_offset() % 4 == 0
        w = t.view(torch.int32).view(n, self.channels, self.temporal, pp // 4) if words else v
        if not all(torch.equal(w[:, :, 0], w[:, :, k]) for k in range(1, self.temporal)):
            return t  # real frames (video): nothing to fold
        return v[:, :, 0].reshape(n, self.folded_width)

    def finish(self, tensors: list[torch.Tensor], device: torch.device | str, dtype: torch.dtype) -> torch.Tensor:
        """uint8 tensors of one layout -> the processor's float output for them, concatenated, on `device`.

        The uint8 crosses to the device first; normalising there and casting last gives the values of the
        float path (processor fp32 on the host, copy, cast) bit for bit."""
        for t in tensors:
            self.check(t, "pixels")
        x = torch.cat(tensors, dim=0).to(device)
        if self.layout == "planes":
            out = self.normalise(x)
        else:
            n, c, t, p = x.shape[0], self.channels, self.temporal, self.patch
            if x.shape[1] == self.width:
                out = self.normalise(x.view(n, c, t * p, p)).reshape(n, self.width)
            else:  # folded: normalise one copy, then repeat it T times (what patchify's expand does)
                one = self.normalise(x.view(n, c, p, p)).view(n, c, 1, p * p)
                out = one.expand(n, c, t, p * p).reshape(n, self.width)
        return out.to(dtype)


class PixelWire:
    """One model's compact pixel forms, derived from its processor and `mm_processor_kwargs`."""

    def __init__(self, processor: Any, mm_processor_kwargs: Mapping[str, Any] | None = None):
        self.processor = processor
        kw = dict(mm_processor_kwargs or {})
        self._forms: dict[str, PixelForm | str] = {m: _form_or_reason(processor, m, kw) for m in _SUB}

    def form(self, modality: str) -> PixelForm | None:
        f = self._forms.get(modality)
        return f if isinstance(f, PixelForm) else None

    def reason(self, modality: str) -> str:
        """Why `modality` has no compact form ("" when it has one)."""
        f = self._forms.get(modality, f"{modality} inputs are computed in float (no integer stage)")
        return "" if isinstance(f, PixelForm) else f

    # ---- ingest side ----------------------------------------------------------------------------------
    def processor_kwargs(self, modality: str, kwargs: dict[str, Any]) -> dict[str, Any]:
        """The processor call's kwargs, stopped before the float stage where `modality` has a compact form."""
        if self.form(modality) is None:
            return kwargs
        name = _CALL_KWARGS[modality]
        return {**kwargs, name: {**dict(kwargs.get(name) or {}), "do_rescale": False, "do_normalize": False}}

    def compact(self, modality: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The processor's outputs in their wire form: uint8 pixels (Qwen's temporal copies folded)."""
        form, key = self.form(modality), PIXEL_KEYS.get(modality)
        if form is None or key not in tensors:
            return tensors
        t = tensors[key]
        if t.dtype == torch.uint8:
            t = form.fold(t)
        else:  # a float input (not what the media loader gives): finish here, the item stays exact
            t = form.finish([t], "cpu", torch.float32)
        return {**tensors, key: t}

    # ---- encoder side ---------------------------------------------------------------------------------
    def on_device(self, modality: str, items: list[ProcessedItem], device: torch.device | str,
                  dtype: torch.dtype) -> list[ProcessedItem]:
        """The items with their uint8 pixels finished on `device` in `dtype`: one host -> device copy and one
        normalisation per batch (per row shape), each item then a view of the result. Float items (the
        fallback, an older sender) are left to the adapter's own path."""
        key = PIXEL_KEYS.get(modality)
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, it in enumerate(items):
            t = it.tensors.get(key) if key else None
            if t is not None and t.dtype == torch.uint8:
                groups.setdefault(tuple(t.shape[1:]), []).append(i)
        if not groups:
            return items
        form = self._require(modality, key)
        out = list(items)
        for members in groups.values():
            ts = [items[i].tensors[key] for i in members]
            done = form.finish(ts, device, dtype)
            for i, part in zip(members, torch.split(done, [t.shape[0] for t in ts], dim=0)):
                it = items[i]
                out[i] = ProcessedItem(modality=it.modality, key=it.key, tensors={**it.tensors, key: part},
                                       meta=it.meta)
        return out

    def check_payload(self, modality: str, tensors: Mapping[str, torch.Tensor], tower_dtype: torch.dtype) -> None:
        """Refuse, before any work, a payload whose embedding would not be the one its cache key names."""
        for key, t in tensors.items():
            if key not in FLOAT_WIRE_KEYS:
                continue
            if t.dtype == torch.uint8 and key == PIXEL_KEYS.get(modality):
                self._require(modality, key).check(t, key)
            elif not t.is_floating_point():
                raise InvalidInputError(f"{key} must be floating point{' or uint8' if self.form(modality) else ''}"
                                        f", got {t.dtype}", param="tensors")
            elif t.dtype not in (torch.float32, torch.float64, tower_dtype):
                raise InvalidInputError(
                    f"{key} arrived as {t.dtype}, narrower than this encoder's {tower_dtype}: the embedding "
                    f"would differ from the one its cache key names (set ingest's --wire-dtype to the "
                    f"encoder's --dtype, or auto)", param="tensors")

    def _require(self, modality: str, key: str) -> PixelForm:
        form = self.form(modality)
        if form is None:
            raise InvalidInputError(
                f"{key} arrived as uint8, but this encoder has no compact form for {modality}: "
                f"{self.reason(modality)}. Ingest and encoder must load the same model and "
                f"--mm-processor-kwargs", param="tensors")
        return form


# ---- the float fallback's wire dtype ----------------------------------------------------------------------
def float_wire_dtype(name: str | None) -> torch.dtype | None:
    """`--wire-dtype`: None (send float32 as the processor made it) for auto / float32, else the dtype."""
    if name in (None, "auto", "float32", "fp32"):
        return None
    from mmpipe.shared.models.registry import resolve_dtype

    return resolve_dtype(name, "cpu")


def wire_tensors(tensors: dict[str, torch.Tensor], wire_dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """Float model inputs cast to `wire_dtype` (exact when it is the encoder's dtype); uint8 pixels as they are."""
    if wire_dtype is None:
        return tensors
    return {k: (v.to(wire_dtype) if k in FLOAT_WIRE_KEYS and v.is_floating_point() else v)
            for k, v in tensors.items()}


# ---- which processors have a compact form -----------------------------------------------------------------
def _form_or_reason(processor: Any, modality: str, call_kwargs: Mapping[str, Any]) -> PixelForm | str:
    sub = getattr(processor, _SUB[modality], None)
    if sub is None:
        return f"the processor has no {_SUB[modality]}"
    cls = type(sub)
    name = f"{cls.__module__}.{cls.__qualname__}"
    if name not in _PLANES and name not in _QWEN_PATCHES or getattr(sub, "backend", None) != "torchvision":
        return (f"{cls.__name__} is not one of the torchvision-backend processors whose only float step is "
                f"rescale_and_normalize (PIL backends rescale in float64 numpy)")
    geometry = ("patch_size", "temporal_patch_size") if name in _QWEN_PATCHES else ()
    padded = ("do_pad",) if name in _CLIP_LIKE else ()
    at_call = sorted(_set_at_call(processor, modality, call_kwargs, _NORM_KEYS + geometry + padded))
    if at_call:
        return f"{', '.join(at_call)} set at call time (mm_processor_kwargs or processor defaults)"
    if not (sub.do_rescale or sub.do_normalize):
        return f"{cls.__name__} neither rescales nor normalises"
    if padded and getattr(sub, "do_pad", False):
        return f"{cls.__name__} pads after normalising (do_pad)"
    if name in _QWEN_PATCHES:
        return PixelForm(sub, "qwen_patches", patch=int(sub.patch_size), temporal=int(sub.temporal_patch_size))
    return PixelForm(sub, "planes")


def _set_at_call(processor: Any, modality: str, call_kwargs: Mapping[str, Any], keys: tuple[str, ...]) -> set[str]:
    """Which of `keys` a processor call would take from somewhere other than the sub-processor's config."""
    nested = _CALL_KWARGS[modality]
    defaults = getattr(getattr(processor, "valid_processor_kwargs", None), "_defaults", None) or {}
    sources = [call_kwargs, call_kwargs.get(nested), call_kwargs.get("common_kwargs"),
               getattr(processor, nested, None), defaults.get(nested), defaults.get("common_kwargs")]
    return {k for src in sources if isinstance(src, Mapping) for k in keys if k in src}


def _hashable(v: Any) -> Any:
    # rescale_and_normalize memoises the fused mean/std on its arguments (functools.lru_cache)
    return tuple(v) if isinstance(v, list) else v
