"""The model adapter contract: everything mmpipe needs to know about one model family.

An adapter says, for its family,
  - which modalities it takes and which placeholder token stands for one item in a prompt,
  - how to preprocess one decoded media item into model tensors (through the HF processor, so the pixels
    and the placeholder count are exactly what `model.generate(**processor(...))` would see),
  - how to run the towers on a batch of items into one (num_tokens, hidden) embedding per item,
  - how to check user-supplied embeddings,
  - what extra LM inputs the prompt needs (M-RoPE positions for Qwen-VL style models), and
  - which modules hold each stage's weights (the encoder's towers, the generator's LM).

Adapters never fetch media, never touch the cache and never decode tokens: those are other layers' jobs.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from functools import cached_property
from typing import Any, ClassVar, NamedTuple

import torch

from mmpipe.shared.errors import InvalidInputError, UnsupportedError
from mmpipe.shared.models.mm_kwargs import KwargRule, resolve_mm_kwargs
from mmpipe.shared.models.pixel_wire import PixelWire
from mmpipe.shared.types import MediaItem, MMEmbedding, ProcessedItem

# Processor outputs that belong to the text side; everything else is a model input for the towers.
_TEXT_KEYS = {"input_ids", "attention_mask", "mm_token_type_ids", "token_type_ids"}


class ItemTokens(NamedTuple):
    """What one item's placeholder becomes in the expanded prompt: `before`, then one `feature` token per
    embedding row, then `after` (Gemma 3: "\\n\\n<start_of_image>", the soft tokens, "<end_of_image>\\n\\n")."""

    before: tuple[int, ...]
    feature: int
    after: tuple[int, ...]


class ModelAdapter(ABC):
    family: ClassVar[str]
    model_types: ClassVar[tuple[str, ...]]
    modalities: ClassVar[tuple[str, ...]]
    # "image_text_to_text" -> AutoModelForImageTextToText, "multimodal_lm" -> AutoModelForMultimodalLM
    auto_class: ClassVar[str] = "image_text_to_text"
    # model_type -> the sub-model of such a checkpoint that mmpipe serves (its config is `<name>_config`, its
    # tensors are under `<name>.`): a full Qwen2.5-Omni checkpoint is served as its thinker
    served_submodel: ClassVar[dict[str, str]] = {}
    uses_mrope: ClassVar[bool] = False
    # True when the processor expands one placeholder into more than its feature tokens (Qwen3-VL's frame
    # timestamps): the item's expansion, as token ids, is then kept in its metadata ("expansion")
    prompt_expansion: ClassVar[bool] = False
    # processor call keyword for each modality
    _processor_arg: ClassVar[dict[str, str]] = {"image": "images", "video": "videos", "audio": "audio"}
    # Module paths of the HF model (after transformers' key renames) whose weights each stage holds: the encoder
    # loads "towers" (everything `encode` runs), the generator "lm" (what the engine reads). Every parameter
    # belongs to exactly one of the two; shared/models/partial.py checks it at load.
    tower_modules: ClassVar[tuple[str, ...]] = ()
    lm_modules: ClassVar[tuple[str, ...]] = ("model.language_model", "lm_head")
    # Extra keywords of `AutoProcessor.from_pretrained` for this family (registry.load_processor).
    processor_kwargs: ClassVar[dict[str, Any]] = {}
    # The mm_processor_kwargs a request may set (shared/models/mm_kwargs.py); none unless a family allows some.
    request_mm_kwargs: ClassVar[dict[str, KwargRule]] = {}

    def __init__(self, model: Any, processor: Any, *, mm_processor_kwargs: dict[str, Any] | None = None,
                 device: torch.device | str | None = None, part: str = "all"):
        self.model = model
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.mm_processor_kwargs = dict(mm_processor_kwargs or {})
        self.text_config = model.config.get_text_config()
        self.hidden_size = int(self.text_config.hidden_size)
        self.part = part
        # Recorded, not read off the first parameter: on a one-stage model that one may be on the meta device.
        self._device = torch.device(device) if device is not None else _held_device(model)

    @property
    def embed_width(self) -> int:
        """The width of one embedding row: the text hidden size (Qwen3-VL's rows also carry deepstack features)."""
        return self.hidden_size

    @classmethod
    def part_modules(cls, part: str) -> tuple[str, ...]:
        """The module paths holding `part`'s weights ("towers" or "lm")."""
        if part == "towers":
            return cls.tower_modules
        if part == "lm":
            return cls.lm_modules
        raise UnsupportedError(f"unknown model part {part!r}; use towers or lm", param="part")

    # ---- placeholders -------------------------------------------------------------------------
    @abstractmethod
    def placeholder_token(self, modality: str) -> str:
        """The token string that stands for one item of `modality` in an (unexpanded) prompt."""

    def placeholder_id(self, modality: str) -> int:
        """The id of `placeholder_token` (looked up once per modality: the tokenizer is fixed after loading)."""
        memo = self.__dict__.setdefault("_placeholder_id_memo", {})
        pid = memo.get(modality)
        if pid is None:
            pid = memo[modality] = int(self.tokenizer.convert_tokens_to_ids(self.placeholder_token(modality)))
        return pid

    def placeholder_ids(self) -> dict[str, int]:
        return {m: self.placeholder_id(m) for m in self.modalities}

    def feature_token_id(self, modality: str) -> int:
        """The token the processor repeats once per embedding row (the placeholder itself, for most families)."""
        return self.placeholder_id(modality)

    def item_tokens(self) -> dict[str, ItemTokens]:
        """Per modality, what a placeholder expands to (inputs/assemble.py); no wrapping by default."""
        return {m: ItemTokens((), self.feature_token_id(m), ()) for m in self.modalities}

    def check_modality(self, modality: str) -> None:
        if modality not in self.modalities:
            raise UnsupportedError(
                f"{self.family} models take {', '.join(self.modalities)} input; got {modality!r}",
                param=modality)

    # ---- media -> model tensors ----------------------------------------------------------------
    @property
    def audio_sampling_rate(self) -> int | None:
        fe = getattr(self.processor, "feature_extractor", None)
        return int(fe.sampling_rate) if fe is not None else None

    @classmethod
    def mm_kwargs_ceilings(cls, processor: Any, server: dict[str, Any]) -> dict[str, float]:
        """The server's value of each capped request key: its --mm-processor-kwargs, else the processor's config."""
        return {k: server[k] for k, r in cls.request_mm_kwargs.items() if r.capped and k in server}

    @classmethod
    def check_mm_kwargs(cls, effective: dict[str, Any]) -> None:
        """Family rules across keys of the effective kwargs (e.g. min_pixels <= max_pixels); none by default."""

    @classmethod
    def resolve_request_mm_kwargs(cls, processor: Any, server: dict[str, Any] | None,
                                  request: dict[str, Any] | str | None) -> dict[str, Any]:
        """The effective mm_processor_kwargs of one request (validated; the server's when it sets none). A class
        method: the gateway checks requests with the processor alone, before any stage works."""
        server = dict(server or {})
        out = resolve_mm_kwargs(cls.family, cls.request_mm_kwargs, cls.mm_kwargs_ceilings(processor, server),
                                server, request)
        if out != server:
            cls.check_mm_kwargs(out)
        return out

    def effective_mm_kwargs(self, request: dict[str, Any] | str | None) -> dict[str, Any]:
        return self.resolve_request_mm_kwargs(self.processor, self.mm_processor_kwargs, request)

    def settings(self, mm_processor_kwargs: dict[str, Any] | None = None) -> dict[str, Any]:
        """Every processor setting that changes an embedding: hashed into the cache key namespace.
        `mm_processor_kwargs`: a request's effective kwargs (default: the server's)."""
        mm = self.mm_processor_kwargs if mm_processor_kwargs is None else mm_processor_kwargs
        out: dict[str, Any] = {"family": self.family, "mm_processor_kwargs": mm}
        for name in ("image_processor", "video_processor", "feature_extractor"):
            sub = getattr(self.processor, name, None)
            if sub is not None:
                out[name] = sub.to_dict()
        return out

    def preprocess(self, item: MediaItem, mm_processor_kwargs: dict[str, Any] | None = None) -> ProcessedItem:
        """One item through the HF processor with a one-placeholder prompt.

        Processing items one by one gives the same tensors as processing them together (each item's rows
        are independent); doing it per item is what lets a cached item skip this step.
        `mm_processor_kwargs`: the request's effective kwargs (`effective_mm_kwargs`; default: the server's).
        """
        self.check_modality(item.modality)
        kwargs: dict[str, Any] = {self._processor_arg[item.modality]: [item.data]}
        if item.modality == "audio":
            kwargs["sampling_rate"] = self.audio_sampling_rate
        # vLLM's mm_processor_kwargs: flat keywords the HF processor routes to its sub-processors.
        mm = self.mm_processor_kwargs if mm_processor_kwargs is None else mm_processor_kwargs
        kwargs.update(self._call_kwargs(item.modality, mm))
        if item.modality == "video":
            kwargs.update(self._video_call_kwargs(item, mm))
        kwargs = self.pixel_wire.processor_kwargs(item.modality, kwargs)  # uint8 pixels where exact
        if self.prompt_expansion:  # the expansion is the placeholder's alone: no BOS / EOS of the tokenizer's
            kwargs["add_special_tokens"] = False
        try:
            out = self.processor(text=self.placeholder_token(item.modality), return_tensors="pt", **kwargs)
        except (ValueError, TypeError, RuntimeError) as e:  # the processor's own validation of the item
            raise InvalidInputError(f"could not preprocess {item.modality}: {e}", param=item.modality) from e
        ids = out["input_ids"][0]
        num_tokens = int((ids == self.feature_token_id(item.modality)).sum())
        tensors = {k: v for k, v in out.items() if k not in _TEXT_KEYS and isinstance(v, torch.Tensor)}
        tensors = self.pixel_wire.compact(item.modality, tensors)
        meta: dict[str, Any] = {"num_tokens": num_tokens}
        if self.prompt_expansion and num_tokens != len(ids):
            meta["expansion"] = [int(t) for t in ids.tolist()]
        meta.update(self._item_meta(item.modality, tensors))
        return ProcessedItem(modality=item.modality, key=item.content_hash, tensors=tensors, meta=meta)

    def _item_meta(self, modality: str, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
        """Plain values the LM side needs later (grid sizes, ...); none by default."""
        return {}

    def _call_kwargs(self, modality: str, mm: dict[str, Any]) -> dict[str, Any]:
        """The effective mm_processor_kwargs as this family's processor call takes them (as given by default)."""
        return dict(mm)

    # Request keys that make the processor sample the decoded frames itself (transformers' do_sample_frames).
    _FRAME_SAMPLING_KEYS: ClassVar[tuple[str, ...]] = ("fps", "num_frames")

    def _video_call_kwargs(self, item: MediaItem, mm: dict[str, Any]) -> dict[str, Any]:
        """The clip's timing for the processor: the decoded frames as a video of their own rate (the loader's
        `sampled_fps`), so transformers derives what depends on time (Qwen2.5-VL's `second_per_grid_ts` =
        temporal_patch_size / sampled fps) exactly as from a clip it loaded itself; and, when the kwargs ask for
        fps / num_frames, the processor's own frame sampling over those frames."""
        out: dict[str, Any] = {}
        fps = (item.meta or {}).get("sampled_fps")
        if fps:
            t = int(item.data.shape[0])
            out["video_metadata"] = [{"fps": float(fps), "total_num_frames": t, "frames_indices": list(range(t))}]
        if any(k in mm for k in self._FRAME_SAMPLING_KEYS):
            out["do_sample_frames"] = True
        return out

    # ---- towers ---------------------------------------------------------------------------------
    @abstractmethod
    def _encode_batch(self, modality: str, items: list[ProcessedItem]) -> list[torch.Tensor]:
        """Run the towers on items of one modality; one (num_tokens, hidden) tensor per item."""

    @torch.inference_mode()
    def encode(self, modality: str, items: list[ProcessedItem]) -> list[MMEmbedding]:
        self.check_modality(modality)
        if self.part == "lm":
            raise UnsupportedError(f"this {self.family} model holds only the LM weights; encode runs in the encoder")
        if not items:
            return []
        items = self.finish(modality, items)  # uint8 pixels to the device first, before any tower reads them
        feats = self._encode_batch(modality, items)
        out = []
        for it, f in zip(items, feats, strict=True):
            if f.shape[0] != it.meta["num_tokens"]:
                raise RuntimeError(f"{self.family}: tower gave {f.shape[0]} rows for an item with "
                                   f"{it.meta['num_tokens']} placeholders")
            out.append(MMEmbedding(modality=modality, tensor=f.detach(), meta=dict(it.meta)))
        return out

    def finish(self, modality: str, items: list[ProcessedItem]) -> list[ProcessedItem]:
        """The first part of `encode`: compact uint8 pixels copied to this adapter's device and normalised there
        (shared/models/pixel_wire.py); items already finished, and float items, pass through unchanged. Public
        so that the encoder service can time it apart from the tower."""
        return self.pixel_wire.on_device(modality, items, self.device, self.model.dtype)

    def _cat(self, items: list[ProcessedItem], key: str) -> torch.Tensor:
        dev = self.device
        dt = self.model.dtype
        ts = [it.tensors[key] for it in items]
        t = torch.cat(ts, dim=0).to(dev)
        return t.to(dt) if t.is_floating_point() else t

    @cached_property
    def pixel_wire(self) -> PixelWire:
        """This model's compact ingest -> encoder pixel forms (shared/models/pixel_wire.py)."""
        return PixelWire(self.processor, self.mm_processor_kwargs)

    @property
    def device(self) -> torch.device:
        """Where the weights this adapter holds live (meta for a preprocessing-only adapter)."""
        return self._device

    # ---- user-supplied embeddings ----------------------------------------------------------------
    def embeds_from_user(self, modality: str, value: Any) -> list[MMEmbedding]:
        """Validate precomputed embeddings: a tensor (num_items, feature_size, hidden), a list of
        (feature_size, hidden) tensors, or the family's dict form. Returns one MMEmbedding per item."""
        self.check_modality(modality)
        if isinstance(value, dict):
            return self._embeds_from_dict(modality, value)
        tensors = _split_items(value, param=f"{modality}_embeds")
        return [self._checked_embedding(modality, t, {}) for t in tensors]

    def _embeds_from_dict(self, modality: str, value: dict) -> list[MMEmbedding]:
        key = f"{modality}_embeds"
        if key not in value:
            raise InvalidInputError(f"embedding dict for {modality} needs the key {key!r}", param=key)
        return [self._checked_embedding(modality, t, {}) for t in _split_items(value[key], param=key)]

    def _checked_embedding(self, modality: str, t: torch.Tensor, meta: dict[str, Any]) -> MMEmbedding:
        if t.ndim != 2:
            raise InvalidInputError(f"{modality}_embeds item must be 2-D (feature_size, hidden), got shape "
                                    f"{tuple(t.shape)}", param=f"{modality}_embeds")
        if t.shape[1] != self.hidden_size:
            raise InvalidInputError(f"{modality}_embeds hidden size is {t.shape[1]}, but this model's text "
                                    f"hidden size is {self.hidden_size}", param=f"{modality}_embeds")
        if t.shape[0] < 1:
            raise InvalidInputError(f"{modality}_embeds item has no rows", param=f"{modality}_embeds")
        if not t.is_floating_point() or not torch.isfinite(t).all():
            raise InvalidInputError(f"{modality}_embeds must be finite floating point values",
                                    param=f"{modality}_embeds")
        m = {"num_tokens": int(t.shape[0]), **meta}
        return MMEmbedding(modality=modality, tensor=t.to(self.model.dtype), meta=m)

    # ---- LM inputs ------------------------------------------------------------------------------
    def mrope_positions(self, token_ids: torch.Tensor, embeddings: list[MMEmbedding]
                        ) -> tuple[torch.Tensor, int] | None:
        """(3, L) M-RoPE positions and the rope delta for one expanded prompt; None for 1-D RoPE models."""
        return None


def _held_device(model: Any) -> torch.device:
    """The device of the first parameter that is not on meta (meta when all are)."""
    for p in model.parameters():
        if p.device.type != "meta":
            return p.device
    return torch.device("meta")


def _split_items(value: Any, *, param: str) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        if value.ndim == 3:
            return list(value.unbind(0))
        if value.ndim == 2:
            return [value]
        raise InvalidInputError(f"{param} must be (num_items, feature_size, hidden) or (feature_size, hidden), "
                                f"got shape {tuple(value.shape)}", param=param)
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, torch.Tensor) for v in value):
        return [v for v in value]
    raise InvalidInputError(f"{param} must be a torch tensor or a list of tensors, got {type(value).__name__}",
                            param=param)
