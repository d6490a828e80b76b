"""The messages between the engine front (core_client.py) and the engine-core process (core_process.py).

One message = one pickled header frame `(kind, body, tensor descriptors)` followed by one raw frame per
tensor, over a `multiprocessing` connection (a Unix socket pair). Tensors never go through pickle: a contiguous
CPU tensor is written as its bytes (no copy on the sending side) and read into a fresh buffer that becomes the
tensor (one copy, the kernel's). Measured on the 2-core CI machine, a 256 x 2048 bf16 embedding (1 MiB) takes
0.35-1 ms to send and receive, against 1.3-1.4 ms through torch.multiprocessing's shared memory (which also needs
a file-descriptor server thread per process).

Kinds, front -> core: "add" (an EngineRequest), "abort" (request ids), "shutdown".
Kinds, core -> front: "ready" (CoreInfo), "failed" (the engine could not be built), "step" (one StepBatch per
engine step: the outputs of ALL requests in that step plus the engine's counters, and the first-token times of
the requests whose first token it sampled), "error" (a request the engine refused), "dead" (the step loop died).

Pickle is used for headers only, between two processes of the same installation started by the front, so it
decodes nothing from outside.
"""
from __future__ import annotations

import dataclasses
import operator
import pickle
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

import torch

from mmpipe.shared import errors
from mmpipe.shared.types import EngineRequest

from .outputs import StepOutput

# EngineRequest fields that hold tensors: sent as raw frames, not pickled
_REQUEST_TENSORS = ("mm_embeds", "mm_positions", "mrope_positions")
# StepOutputs travel as plain tuples of their fields: pickling 128 dataclasses took 0.8 ms each way on the CI
# machine, their tuples 0.15 ms to encode and 0.2 ms to decode and rebuild
_OUTPUT_FIELDS = tuple(f.name for f in dataclasses.fields(StepOutput))
_output_row = operator.attrgetter(*_OUTPUT_FIELDS)


@dataclass
class EngineSnapshot:
    """The engine's state after one step, for the front's metrics: what LLMEngine's counters, scheduler and
    KV cache said at that moment. `stats` is LLMEngine.stats; `kv` is LLMEngine.kv_cache_info()."""

    num_running: int = 0
    num_waiting: int = 0
    stats: dict[str, int] = field(default_factory=dict)
    kv: dict[str, Any] = field(default_factory=dict)


@dataclass
class CoreInfo:
    """Sent once by the core when its engine is built: its snapshot, the loader's facts (e.g. the bytes of
    weights it holds) and the core's pid."""

    snapshot: EngineSnapshot
    load_info: dict[str, Any]
    pid: int


@dataclass
class StepBatch:
    """One engine step: a row of StepOutput fields per request that got an output, the engine's state, and
    (request id, first scheduled, first token) of each request whose first token this step sampled
    (timing.FirstTokenClock; usually empty)."""

    rows: list[tuple]
    snapshot: EngineSnapshot
    first_tokens: list[tuple[str, float, float]] = field(default_factory=list)

    @classmethod
    def of(cls, outputs: list[StepOutput], snapshot: EngineSnapshot,
           first_tokens: list[tuple[str, float, float]] | None = None) -> "StepBatch":
        return cls([_output_row(o) for o in outputs], snapshot, first_tokens or [])

    def outputs(self) -> list[StepOutput]:
        return [StepOutput(*row) for row in self.rows]


def send(conn: Connection, kind: str, body: Any = None, tensors: tuple[torch.Tensor, ...] = ()) -> None:
    """Write one message. Not thread-safe: one writer per connection end (or a lock around it)."""
    raw = [_bytes_of(t) for t in tensors]
    descs = [(str(t.dtype).removeprefix("torch."), tuple(t.shape), mv.nbytes) for t, mv in zip(tensors, raw)]
    conn.send_bytes(pickle.dumps((kind, body, descs), protocol=pickle.HIGHEST_PROTOCOL))
    for mv in raw:
        conn.send_bytes(mv)


def recv(conn: Connection) -> tuple[str, Any, list[torch.Tensor]]:
    """Read one message: (kind, body, tensors). Raises EOFError / OSError when the other end is gone."""
    kind, body, descs = pickle.loads(conn.recv_bytes())
    tensors = []
    for dtype, shape, nbytes in descs:
        dt = getattr(torch, dtype)
        if nbytes == 0:
            conn.recv_bytes()
            tensors.append(torch.empty(shape, dtype=dt))
            continue
        buf = bytearray(nbytes)
        conn.recv_bytes_into(buf)
        tensors.append(torch.frombuffer(buf, dtype=torch.uint8).view(dt).reshape(shape))
    return kind, body, tensors


def _bytes_of(t: torch.Tensor) -> memoryview:
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    # a flat byte view: Connection.send_bytes takes len() of a memoryview, which is its first dimension only
    return memoryview(t.contiguous().reshape(-1).view(torch.uint8).numpy())


# ---- requests ------------------------------------------------------------------------------------------------
def send_request(conn: Connection, req: EngineRequest) -> None:
    present = tuple(name for name in _REQUEST_TENSORS if getattr(req, name) is not None)
    tensors = tuple(torch.as_tensor(getattr(req, name)) for name in present)
    head = dataclasses.replace(req, **{name: None for name in present})
    send(conn, "add", (head, present), tensors)


def request_from(body: Any, tensors: list[torch.Tensor]) -> EngineRequest:
    head, present = body
    return dataclasses.replace(head, **dict(zip(present, tensors)))


# ---- errors --------------------------------------------------------------------------------------------------
def error_body(request_id: str, e: errors.MMPipeError) -> tuple[str, str, str, str | None]:
    return request_id, type(e).__name__, e.message, e.param


def error_from(body: tuple[str, str, str, str | None]) -> tuple[str, errors.MMPipeError]:
    """The same error class the engine raised (LimitExceededError stays one), by name from shared/errors.py."""
    request_id, name, message, param = body
    cls = getattr(errors, name, None)
    if not (isinstance(cls, type) and issubclass(cls, errors.MMPipeError)):
        cls = errors.MMPipeError
    return request_id, cls(message, param=param)
