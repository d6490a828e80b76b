"""What the gateway knows about the served model: tokenizer, chat template, modalities and placeholders.

Loads the model's config and processor (tokenizer + chat template), never its weights. Placeholder tokens
are read from the processor exactly as the model adapters read them (`processor.<modality>_token`), so the
gateway's placeholder check counts the same tokens the generator later expands.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from mmpipe.shared.chat.templates import load_template_arg, resolve_template
from mmpipe.shared.errors import InvalidInputError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelInfo:
    family: str
    modalities: tuple[str, ...]
    processor: Any  # the HF processor; `.tokenizer` tokenises, `apply_template` needs both
    placeholder_tokens: dict[str, str]  # modality -> placeholder token string
    placeholder_ids: dict[str, int]  # modality -> placeholder token id
    chat_template: str | None  # the resolved default template (None: no template at all)
    max_model_len: int | None
    vocab_size: int
    adapter_class: Any = None  # the family's ModelAdapter class: its per-request mm_processor_kwargs rules

    @property
    def tokenizer(self) -> Any:
        return self.processor.tokenizer

    def template(self, override: str | None) -> str:
        """The template of one request: its own, else the server's; a clear 400 when there is none."""
        if override:
            return override
        if self.chat_template is None:
            raise InvalidInputError("the model has no chat template; start the gateway with --chat-template "
                                    "or send chat_template with the request", param="chat_template")
        return self.chat_template


def load_model_info(model: str, *, chat_template: str | None = None, max_model_len: int | None = None,
                    trust_remote_code: bool = False) -> ModelInfo:
    """Load config + processor of `model` (a local directory or a hub id) without its weights."""
    from mmpipe.shared.models.registry import load_processor, resolve_model

    t0 = time.perf_counter()
    resolved = resolve_model(model, trust_remote_code=trust_remote_code)
    cls, config = resolved.cls, resolved.config
    processor = load_processor(model, cls, trust_remote_code=trust_remote_code)
    tokens = {m: str(getattr(processor, f"{m}_token")) for m in cls.modalities}
    ids = {m: int(processor.tokenizer.convert_tokens_to_ids(t)) for m, t in tokens.items()}
    try:
        template: str | None = resolve_template(cls.family, processor, load_template_arg(chat_template))
    except InvalidInputError:
        template = None  # completions still work; chat requests get a clear 400
    text_cfg = config.get_text_config()
    model_len = max_model_len or getattr(text_cfg, "max_position_embeddings", None)
    info = ModelInfo(family=cls.family, modalities=tuple(cls.modalities), processor=processor,
                     placeholder_tokens=tokens, placeholder_ids=ids, chat_template=template,
                     max_model_len=model_len, vocab_size=len(processor.tokenizer), adapter_class=cls)
    logger.info("gateway loaded tokenizer/processor of %s (%s, modalities %s) in %.2f s", model, cls.family,
                ",".join(cls.modalities), time.perf_counter() - t0)
    return info
