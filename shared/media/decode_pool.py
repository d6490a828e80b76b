"""Native decoders (Pillow, FFmpeg via PyAV or decord, libsndfile) isolated in a small pool of worker processes.

Owns: `DecodePool` (N spawned workers, each decoding one item at a time under rlimits: CPU seconds per item and an
address-space cap, plus a wall-clock timeout the parent enforces), replacing a worker that dies or hangs, and the
error of the item that was on it: `MediaDecodeError` naming the item when the input killed it (a signal such as
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
import multiprocessing as mp
import os
import queue
import resource
import signal
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import MediaDecodeError, MMPipeError, ServiceUnavailableError

TEST_FAULTS_ENV = "MMPIPE_TEST_DECODE_FAULTS"
_FAULT = b"MMPIPE-FAULT:"
# Signals that mean "this input broke the decoder" (SIGKILL does not: the OOM killer or an operator sent it).
_INPUT_SIGNALS = {signal.SIGSEGV, signal.SIGABRT, signal.SIGBUS, signal.SIGFPE, signal.SIGILL, signal.SIGXCPU}


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

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when a worker ends
    if cfg.memory_mb > 0:
        cap = cfg.memory_mb * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    while True:
        try:
            msg = conn.recv()
        except EOFError:
            return
        if msg is None:
            return
        kind, data, args = msg
        used = resource.getrusage(resource.RUSAGE_SELF)
        spent = int(used.ru_utime + used.ru_stime)
        # RLIMIT_CPU counts the process's whole life: move the soft limit to "now + this item's share".
        hard = resource.getrlimit(resource.RLIMIT_CPU)[1]
        soft = spent + int(cfg.cpu_seconds) + 1
        resource.setrlimit(resource.RLIMIT_CPU, (soft if hard == resource.RLIM_INFINITY else min(soft, hard), hard))
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
class _Worker:
    def __init__(self, ctx: Any, cfg: DecodePoolConfig):
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker_main, args=(child, cfg), name="mmpipe-decode", daemon=True)
        self.proc.start()
        child.close()

    def stop(self, kill: bool = False) -> None:
        if kill:
            self.proc.kill()
        else:
            try:
                self.conn.send(None)
            except (OSError, ValueError):
                self.proc.kill()
        self.proc.join(5)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(5)
        self.conn.close()


def _exit_code(proc: Any, timeout_s: float) -> int | None:
    """The exit status of a worker whose pipe reached EOF (None only if it is still running after `timeout_s`).

    `Process.join()` / `.exitcode` alone are not enough: every `Process.start()` and `active_children()` in this
    process (a replacement worker started by another thread, for one) runs multiprocessing's `_cleanup()`, which
    reaps each finished child with waitpid(WNOHANG). When that reaps our worker first, this thread's waitpid fails
    with ECHILD and `Popen.poll()` answers None for a dead process; the status reaches the shared Popen object only
    when that other thread next holds the GIL. So: wait for the exit (the sentinel), then re-read the status until
    it is there, sleeping (and so letting the other thread finish) in between."""
    from multiprocessing.connection import wait

    deadline = time.monotonic() + timeout_s
    wait([proc.sentinel], timeout_s)
    while True:
        code = proc.exitcode
        if code is not None or time.monotonic() >= deadline:
            return code
        time.sleep(0.005)


class DecodePool:
    """`decode(kind, data, args, what)` on one of `cfg.workers` spawned processes (thread-safe; callers block on a
    free worker). A dead or hung worker is replaced before the next item is given to it."""

    def __init__(self, cfg: DecodePoolConfig | None = None):
        self.cfg = cfg or DecodePoolConfig()
        if self.cfg.workers < 1:
            raise ValueError("a DecodePool needs at least one worker")
        # spawn, not fork: the parent runs gRPC / uvicorn threads, and a forked copy of them is not safe.
        self._ctx = mp.get_context("spawn")
        self._idle: queue.Queue[_Worker] = queue.Queue()
        self._closed = False
        self.replaced = 0  # workers replaced after a crash or a hang (a gauge for tests and metrics)
        self._lock = threading.Lock()
        for _ in range(self.cfg.workers):
            self._idle.put(_Worker(self._ctx, self.cfg))

    def decode(self, kind: str, data: bytes, args: dict[str, Any], what: str) -> tuple[np.ndarray, dict[str, Any],
                                                                                        tuple[int, float]]:
        """(decoded array: image (H, W, 3) uint8 / video (T, H, W, 3) uint8 / audio float32, metadata, (pixels,
        audio seconds) the worker charged). Decoder errors come back as the same domain errors."""
        if self._closed:
            raise ServiceUnavailableError("the decode pool is shut down")
        w = self._idle.get()
        while not w.proc.is_alive():  # died while idle (killed from outside): replaced before it costs an item
            self._replace(w)
            w = self._idle.get()
        healthy = False
        try:
            try:
                w.conn.send((kind, data, args))
            except (OSError, ValueError, BrokenPipeError):
                raise ServiceUnavailableError(f"{what}: the decode worker was unavailable; retry") from None
            if not w.conn.poll(self.cfg.timeout_s):
                raise MediaDecodeError(f"{what}: decoding took longer than {self.cfg.timeout_s:g} s and was stopped",
                                       param=what)
            try:
                reply = w.conn.recv()
            except (EOFError, OSError):
                raise self._death(w, what) from None
            healthy = True
        finally:
            if healthy:
                self._idle.put(w)
            else:
                self._replace(w)
        return self._unpack(reply, what)

    def _death(self, w: _Worker, what: str) -> MMPipeError:
        code = _exit_code(w.proc, 5.0)
        if code is not None and code < 0 and -code in {int(s) for s in _INPUT_SIGNALS}:
            name = signal.Signals(-code).name
            why = "used more CPU time than allowed" if -code == signal.SIGXCPU else f"crashed ({name})"
            return MediaDecodeError(f"{what}: the decoder {why} on this input", param=what)
        return ServiceUnavailableError(f"{what}: the decode worker exited unexpectedly (exit code {code}); retry")

    def _replace(self, w: _Worker) -> None:
        w.stop(kill=True)
        with self._lock:
            self.replaced += 1
        if not self._closed:
            self._idle.put(_Worker(self._ctx, self.cfg))

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
        self._closed = True
        while True:
            try:
                w = self._idle.get_nowait()
            except queue.Empty:
                return
            w.stop()


def remaining(budget: Any) -> Any:
    """The part of a request's budget still free, as BudgetLimits for a worker (None: no budget)."""
    from .budget import BudgetLimits

    if budget is None:
        return None
    lim = budget.limits
    return BudgetLimits(image_pixels=lim.image_pixels, request_pixels=max(0, lim.request_pixels - budget.pixels),
                        request_audio_seconds=max(0.0, lim.request_audio_seconds - budget.audio_seconds))
