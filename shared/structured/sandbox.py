"""The grammar engine run isolated: llguidance is native (Rust) code, and a spec that crashes it (one did: an
integer range at the edge of i64, see limits.py) must cost that request a 400, not the gateway its life with
every stream it serves.

Owns: `GrammarSandbox.compile(params)`: a spec turned into its grammar and validated against the tokenizer
(grammar.py's `checked_grammar`, the same rule as in-process) on a spawned worker of shared/isolated.py that
holds the llguidance tokenizer, under a wall-clock timeout (`MMPIPE_STRUCTURED_OUTPUTS_COMPILE_TIMEOUT_S`), a CPU
share and an address-space cap. A crash or a timeout is a 400 naming the field (and is remembered by the
compiler's cache of refusals, so repeating it costs nothing); the worker is replaced.
Used by the gateway (every spec is checked there, before any stage works; the generator then compiles only
specs that passed). The worker starts on the first spec and builds its tokenizer before it takes one (that
time is not charged to the spec).
"""
from __future__ import annotations

import threading
from typing import Any

from mmpipe.shared.errors import InvalidInputError, ServiceUnavailableError
from mmpipe.shared.isolated import IsolatedPool, WorkerFault, items, worker_setup

from .params import StructuredOutputsParams

_STARTUP_S = 120.0  # building the llguidance tokenizer of a 150k vocabulary on a loaded 2-core machine
_MEMORY_MB = 4096
_READY = "ready"


def _worker_main(conn: Any, tokenizer: Any, vocab_size: int, cpu_seconds: int) -> None:
    import llguidance.hf

    from .grammar import checked_grammar

    worker_setup(_MEMORY_MB)
    ll_tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size)
    conn.send(_READY)
    for msg in items(conn, cpu_seconds):
        try:
            conn.send(("ok", checked_grammar(msg, ll_tokenizer)))
        except InvalidInputError as e:
            conn.send(("refused", e.message))
        except Exception as e:  # noqa: BLE001 - an engine bug: the spec fails, the worker goes on
            conn.send(("refused", f"the grammar engine failed on it ({type(e).__name__})"))


class GrammarSandbox:
    def __init__(self, tokenizer: Any, vocab_size: int, timeout_s: float):
        self.timeout_s = timeout_s
        self._args = (tokenizer, vocab_size, max(1, int(timeout_s)))
        self._pool: IsolatedPool | None = None
        self._lock = threading.Lock()

    @property
    def replaced(self) -> int:
        return self._pool.replaced if self._pool is not None else 0

    def compile(self, params: StructuredOutputsParams) -> str:
        """The validated grammar text of `params`; InvalidInputError naming the field when the engine refuses
        it, crashes on it or takes longer than the timeout; 503 when the worker went away on its own."""
        pool = self._started()
        try:
            reply = pool.call(params, self.timeout_s)
        except WorkerFault as f:
            if f.input_fault:
                raise InvalidInputError(f"invalid or unsupported {params.param}: the grammar engine {f.reason} on "
                                        f"it", param=params.param) from None
            raise ServiceUnavailableError(f"the grammar-engine worker failed ({f.reason}); retry") from None
        if reply[0] == "ok":
            return reply[1]
        raise InvalidInputError(reply[1], param=params.param)

    def _started(self) -> IsolatedPool:
        with self._lock:
            if self._pool is None:
                self._pool = IsolatedPool(_worker_main, self._args, workers=1, name="mmpipe-grammar",
                                          ready=_READY, startup_s=_STARTUP_S)
            return self._pool

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
