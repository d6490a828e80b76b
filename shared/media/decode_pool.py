"""Native decoders (Pillow, FFmpeg via PyAV or decord, libsndfile) isolated in a small pool of worker processes.

Owns: `DecodePool` (N spawned workers of shared/isolated.py, each decoding one item at a time under rlimits: CPU
seconds per item and an address-space cap, plus a wall-clock timeout the parent enforces), and the error of the
item whose worker died or hung: `MediaDecodeError` naming the item when the input killed it (a signal such as
SIGSEGV / SIGABRT / SIGXCPU, memory exhausted, or the timeout), `ServiceUnavailableError` (503, retryable) when
the worker went away for a reason of its own (killed from outside). Every other item goes on.
Decoded pixels / frames / samples come back in shared memory (one copy into the caller's memory), not pickled;
only the encoded bytes and small metadata cross the pipe.
Must not: know about requests, gRPC or models; the decoders themselves live in image.py / video.py / audio.py.

Test-only faults: with MMPIPE_TEST_DECODE_FAULTS=1 in the WORKER's environment, data starting with b"MMPIPE-FAULT:"
+ abort / segv / hang makes the worker abort, segfault or hang (tests/test_decode_pool.py). Without the variable
those bytes are just an undecodable file.
"""
from __future__ import annotations

import ctypes
import os
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import MediaDecodeError, MMPipeError, ServiceUnavailableError
from ..isolated import IsolatedPool, WorkerFault, items, worker_setup

TEST_FAULTS_ENV = "MMPIPE_TEST_DECODE_FAULTS"
_FAULT = b"MMPIPE-FAULT:"


@dataclass(frozen=True)
class DecodePoolConfig:
    """workers: processes; timeout_s: wall-clock seconds per item; cpu_seconds: CPU seconds per item (RLIMIT_CPU);
    memory_mb: address-space cap of a worker (RLIMIT_AS; 0 = none)."""

    workers: int = 2
    timeout_s: float = 30.0
    cpu_seconds: int = 30
    memory_mb: int = 8192


# --------------------------------------------------------------------------------------------------- the worker
def _test_fault(data: bytes) -> None:
    if os.environ.get(TEST_FAULTS_ENV) != "1" or not data.startswith(_FAULT):
        return
    kind = data[len(_FAULT):len(_FAULT) + 5]
    if kind == b"abort":
        os.abort()
    if kind == b"segv ":
        ctypes.string_at(0)  # reads address 0: SIGSEGV in native code
    if kind == b"hang ":
        while True:
            time.sleep(1)


def _decode(kind: str, data: bytes, args: dict[str, Any]) -> tuple[np.ndarray, dict[str, Any], Any]:
    """(array to hand back, metadata, the worker-side budget) for one item, with the decoders of shared/media."""
    from .budget import BudgetLimits, RequestBudget

    budget = RequestBudget(args["limits"]) if isinstance(args.get("limits"), BudgetLimits) else None
    policy = args["policy"]
    if kind == "image":
        from .image import decode_image

        img = decode_image(data, args["opts"], max_pixels=policy.max_image_pixels, budget=budget)
        return np.asarray(img), {}, budget
    if kind == "video":
        from .video import decode_video

        frames, meta = decode_video(data, args["opts"], policy, budget, args["video_backend"])
        return frames, meta, budget
    from .audio import decode_audio

    wav, sr = decode_audio(data, max_seconds=policy.max_audio_seconds, max_samples=policy.max_audio_samples,
                           budget=budget)
    return wav, {"sampling_rate": sr}, budget


def _worker_main(conn: Any, cfg: DecodePoolConfig) -> None:
    from multiprocessing import resource_tracker, shared_memory

    worker_setup(cfg.memory_mb)
    for kind, data, args in items(conn, cfg.cpu_seconds):
        try:
            _test_fault(data)
            arr, meta, budget = _decode(kind, data, args)
            arr = np.ascontiguousarray(arr)
            shm = shared_memory.SharedMemory(create=True, size=max(1, arr.nbytes))
            resource_tracker.unregister(shm._name, "shared_memory")  # the parent owns and unlinks it
            np.ndarray(arr.shape, arr.dtype, buffer=shm.buf)[...] = arr
            reply = ("ok", shm.name, arr.shape, arr.dtype.str, meta,
                     (budget.pixels, budget.audio_seconds) if budget is not None else (0, 0.0))
            shm.close()
            del arr
            conn.send(reply)
        except MMPipeError as e:
            conn.send(("err", type(e).__name__, e.message, e.param))
        except MemoryError:
            conn.send(("err", "MediaDecodeError", f"decoding ran out of memory (the decode worker's limit is "
                                                  f"{cfg.memory_mb} MB)", None))
        except Exception as e:  # a decoder bug: the item fails, the worker goes on
            conn.send(("err", "MediaDecodeError", f"the decoder failed: {type(e).__name__}", None))


# --------------------------------------------------------------------------------------------------- the parent
class DecodePool:
    """`decode(kind, data, args, what)` on one of `cfg.workers` spawned processes (thread-safe; callers block on a
    free worker). A dead or hung worker is replaced before the next item is given to it (shared/isolated.py)."""

    def __init__(self, cfg: DecodePoolConfig | None = None):
        self.cfg = cfg or DecodePoolConfig()
        if self.cfg.workers < 1:
            raise ValueError("a DecodePool needs at least one worker")
        self._pool = IsolatedPool(_worker_main, (self.cfg,), workers=self.cfg.workers, name="mmpipe-decode")

    @property
    def replaced(self) -> int:
        """Workers replaced after a crash or a hang (a gauge for tests and metrics)."""
        return self._pool.replaced

    def decode(self, kind: str, data: bytes, args: dict[str, Any], what: str) -> tuple[np.ndarray, dict[str, Any],
                                                                                        tuple[int, float]]:
        """(decoded array: image (H, W, 3) uint8 / video (T, H, W, 3) uint8 / audio float32, metadata, (pixels,
        audio seconds) the worker charged). Decoder errors come back as the same domain errors."""
        if self._pool.closed:
            raise ServiceUnavailableError("the decode pool is shut down")
        try:
            reply = self._pool.call((kind, data, args), self.cfg.timeout_s)
        except WorkerFault as f:
            if f.kind == "timeout":
                raise MediaDecodeError(f"{what}: decoding {f.reason}", param=what) from None
            if f.kind == "crash":
                raise MediaDecodeError(f"{what}: the decoder {f.reason} on this input", param=what) from None
            raise ServiceUnavailableError(f"{what}: {f.reason.replace('the worker', 'the decode worker')}; retry") \
                from None
        return self._unpack(reply, what)

    @staticmethod
    def _unpack(reply: tuple, what: str) -> tuple[np.ndarray, dict[str, Any], tuple[int, float]]:
        from multiprocessing import shared_memory

        from .. import errors

        if reply[0] == "err":
            _, cls_name, message, param = reply
            cls = getattr(errors, cls_name, MediaDecodeError)
            if not (isinstance(cls, type) and issubclass(cls, MMPipeError)):
                cls = MediaDecodeError
            raise cls(message, param=param)
        _, name, shape, dtype, meta, charged = reply
        shm = shared_memory.SharedMemory(name=name)
        try:
            view = np.ndarray(shape, np.dtype(dtype), buffer=shm.buf)
            arr = view.copy()  # the one copy, into this process's memory
            del view
        finally:
            shm.close()
            shm.unlink()
        return arr, meta, charged

    def close(self) -> None:
        self._pool.close()


def remaining(budget: Any) -> Any:
    """The part of a request's budget still free, as BudgetLimits for a worker (None: no budget)."""
    from .budget import BudgetLimits

    if budget is None:
        return None
    lim = budget.limits
    return BudgetLimits(image_pixels=lim.image_pixels, request_pixels=max(0, lim.request_pixels - budget.pixels),
                        request_audio_seconds=max(0.0, lim.request_audio_seconds - budget.audio_seconds))
