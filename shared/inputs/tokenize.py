"""Prompt text -> token ids, each piece between added tokens tokenized once (a chat re-sends its whole history).

A fast tokenizer (tokenizers' AddedVocabulary) first cuts its input at its added tokens, special or not, and
then runs the normalizer, the pre-tokenizer and the model on every piece between them on its own: `encode(text)`
is the concatenation, in order, of each added token's id and each piece's ids. A multi-turn chat's rendered
prompt repeats the previous turn's pieces (every message sits between <|im_start|> and <|im_end|> in ChatML, and
an image's placeholder is an added token too), so `PromptTokenizer` keeps the ids of recent pieces and tokenizes
only the new ones: on a ~1,000-token third turn that is ~0.6 ms of tokenisation per request down to the new
question's (bench/chat_host_profile.py).

Exact only where nothing in the pipeline looks across pieces or at a piece's place in the text, so the piecewise
path is taken only when (`piecewise_splitter`) every added token has no lstrip / rstrip / single_word (they take
the whitespace or word around them) and is matched on the raw text (normalized=False), the
backend splits special tokens (`encode_special_tokens` off) and truncates / pads nothing, and the pre-tokenizer
is built only of position-free parts (ByteLevel without a prefix space, Split, Digits, Punctuation, Whitespace,
Metaspace that prepends always or never: Metaspace's "first" treats the text's first piece alone); then a probe
text over every added token must tokenize the same both ways. Anything else (a slow tokenizer, mistral-common,
add_special_tokens=True, which may add BOS / EOS around the whole text) tokenizes the whole text each time.
"""
from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict
from typing import Any

_POSITION_FREE = {"ByteLevel", "Split", "Digits", "Punctuation", "Whitespace", "WhitespaceSplit", "BertPreTokenizer",
                  "CharDelimiterSplit", "UnicodeScripts"}
_PROBE = "a\n {tok} b{tok}{tok}\n\nc  {tok}d é 12 {tok}\t"


class PromptTokenizer:
    """`tokenizer(text, add_special_tokens=...).input_ids`, memoising the pieces between added tokens (LRU of
    at most `max_pieces` pieces and `max_chars` characters in all, each piece at most `max_piece_chars`; the total
    bounds what a stream of unique long prompts can make it hold, ~20 MB at the defaults; thread-safe)."""

    def __init__(self, tokenizer: Any, *, max_pieces: int = 4096, max_piece_chars: int = 1 << 16,
                 max_chars: int = 1 << 21):
        self.tokenizer = tokenizer
        self.max_pieces = max_pieces
        self.max_piece_chars = max_piece_chars
        self.max_chars = max_chars
        self._chars = 0
        self._pieces: OrderedDict[str, tuple[int, ...]] = OrderedDict()
        self._lock = threading.Lock()
        found = piecewise_splitter(tokenizer)
        self._split, self._added = found if found is not None else (None, {})
        if self._split is not None and not self._probe_agrees():
            self._split = None

    @property
    def piecewise(self) -> bool:
        """Whether texts are tokenized piece by piece (else whole, every call)."""
        return self._split is not None

    def encode(self, text: str, *, add_special_tokens: bool = False) -> list[int]:
        if add_special_tokens or self._split is None:
            return list(self.tokenizer(text, add_special_tokens=add_special_tokens).input_ids)
        parts = self._split.split(text)  # the added tokens are the odd entries (one capturing group)
        with self._lock:
            known = [self._pieces.get(p) if i % 2 == 0 and p else None for i, p in enumerate(parts)]
            for i in range(0, len(parts), 2):
                if known[i] is not None:
                    self._pieces.move_to_end(parts[i])
        todo = sorted({p for i, p in enumerate(parts) if i % 2 == 0 and p and known[i] is None})
        if todo:
            fresh = dict(zip(todo, (tuple(x) for x in self.tokenizer(todo, add_special_tokens=False).input_ids)))
            with self._lock:
                for p, ids in fresh.items():
                    if len(p) <= self.max_piece_chars and p not in self._pieces:
                        self._pieces[p] = ids
                        self._chars += len(p)
                while len(self._pieces) > self.max_pieces or self._chars > self.max_chars:
                    self._chars -= len(self._pieces.popitem(last=False)[0])
            for i in range(0, len(parts), 2):
                if parts[i] and known[i] is None:
                    known[i] = fresh[parts[i]]
        out: list[int] = []
        added = self._added
        for i, p in enumerate(parts):
            if i % 2:
                out.append(added[p])
            elif p:
                out.extend(known[i])  # type: ignore[arg-type]
        return out

    def _probe_agrees(self) -> bool:
        """The piecewise path against the whole text, on a text with every added token around whitespace."""
        text = "".join(_PROBE.format(tok=tok) for tok in self._added)
        same = self.encode(text) == list(self.tokenizer(text, add_special_tokens=False).input_ids)
        with self._lock:
            self._pieces.clear()
            self._chars = 0
        return same


def piecewise_splitter(tokenizer: Any) -> tuple[re.Pattern[str], dict[str, int]] | None:
    """(a pattern whose `split` cuts a text at its added tokens, leftmost-longest as tokenizers matches them;
    added token -> id), or None when tokenizing piece by piece could differ from tokenizing the whole text."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    try:
        from tokenizers import Tokenizer
    except ImportError:  # pragma: no cover - transformers' fast tokenizers need it
        return None
    if not isinstance(backend, Tokenizer):
        return None
    if backend.truncation is not None or backend.padding is not None or backend.encode_special_tokens:
        return None
    if not _position_free(backend.pre_tokenizer):
        return None
    added: dict[str, int] = {}
    for tid, tok in backend.get_added_tokens_decoder().items():
        if tok.lstrip or tok.rstrip or tok.single_word or tok.normalized or not tok.content:
            return None
        if added.setdefault(tok.content, int(tid)) != int(tid):
            return None
    if not added:
        return None
    alternatives = sorted(added, key=lambda s: (-len(s), s))  # longest first: leftmost-longest, as tokenizers
    return re.compile("(" + "|".join(re.escape(s) for s in alternatives) + ")"), added


def _position_free(pre: Any) -> bool:
    if pre is None:
        return True
    try:
        state = json.loads(pre.__getstate__())
    except (AttributeError, TypeError, ValueError):
        return False
    return _state_position_free(state)


def _state_position_free(state: dict) -> bool:
    kind = state.get("type")
    if kind == "Sequence":
        return all(_state_position_free(s) for s in state.get("pretokenizers", []))
    if kind == "ByteLevel":
        return not state.get("add_prefix_space", False)
    if kind == "Metaspace":
        return state.get("prepend_scheme") in ("always", "never")
    return kind in _POSITION_FREE
