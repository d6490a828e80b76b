"""Native code in spawned worker processes, so that a crash or a hang in it costs one item, not the process.

Owns: the worker process (spawned; SIGINT ignored, the parent decides when it ends), the pool of them (callers
block on a free worker; a dead or hung one is replaced before the next item is given to it), the per-item rlimits
a worker sets on itself (CPU seconds, address space), and how a death is read: `WorkerFault.input_fault` when a
signal says the input broke the native code (SIGSEGV, SIGABRT, SIGBUS, SIGFPE, SIGILL, SIGXCPU) or the item ran
past its wall-clock time, against a death of the worker's own (killed from outside: SIGKILL is the OOM killer or
an operator).
Users: shared/media/decode_pool.py (Pillow, FFmpeg, libsndfile) and shared/structured/sandbox.py (the grammar
engine). Each gives its own worker loop (`main(conn, *args)`, a module-level function) and turns a WorkerFault
into its own error.
Must not: know what the workers compute.
"""
from __future__ import annotations

import multiprocessing as mp
import queue
import resource
import signal
import threading
import time
from typing import Any, Callable, Iterator

# Signals that mean "this input broke the native code" (SIGKILL does not: the OOM killer or an operator sent it).
INPUT_SIGNALS = {signal.SIGSEGV, signal.SIGABRT, signal.SIGBUS, signal.SIGFPE, signal.SIGILL, signal.SIGXCPU}


class WorkerFault(Exception):
    """The item's worker died, hung or could not be reached. `kind`: "crash" (a signal that blames the input),
    "timeout" (past the item's wall-clock time), both input faults, so the item fails with a client error; or
    "gone" (killed from outside, unreachable, shut down): not the input's fault, the caller may retry (503)."""

    def __init__(self, kind: str, reason: str):
        super().__init__(reason)
        self.kind = kind
        self.reason = reason

    @property
    def input_fault(self) -> bool:
        return self.kind in ("crash", "timeout")


# --------------------------------------------------------------------------------------------- in the worker
def worker_setup(memory_mb: int) -> None:
    """First thing a worker loop does: ignore SIGINT and cap the address space (memory_mb 0: no cap)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if memory_mb > 0:
        cap = memory_mb * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))


def cpu_share(seconds: int) -> None:
    """Let the next item use `seconds` more CPU time (RLIMIT_CPU counts the process's whole life: the soft limit
    moves to "now + this item's share"; past it the kernel sends SIGXCPU, an input fault)."""
    used = resource.getrusage(resource.RUSAGE_SELF)
    spent = int(used.ru_utime + used.ru_stime)
    hard = resource.getrlimit(resource.RLIMIT_CPU)[1]
    soft = spent + int(seconds) + 1
    resource.setrlimit(resource.RLIMIT_CPU, (soft if hard == resource.RLIM_INFINITY else min(soft, hard), hard))


def items(conn: Any, cpu_seconds: int) -> Iterator[Any]:
    """A worker loop's messages, until the parent sends None or goes away; each with its CPU share set."""
    while True:
        try:
            msg = conn.recv()
        except EOFError:
            return
        if msg is None:
            return
        cpu_share(cpu_seconds)
        yield msg


# --------------------------------------------------------------------------------------------- in the parent
class _Worker:
    def __init__(self, ctx: Any, main: Callable[..., None], args: tuple, name: str, ready: bool):
        self.ready = ready  # False until the worker said it finished starting
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=main, args=(child, *args), name=name, daemon=True)
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


def _exited(proc: Any) -> bool:
    """Whether a worker has exited, from its sentinel (readable once the process is gone), not `is_alive()`:
    that asks waitpid, and when another thread's multiprocessing `_cleanup()` reaped the worker first it
    answers "alive" for a dead process (see _exit_code)."""
    from multiprocessing.connection import wait

    return bool(wait([proc.sentinel], 0))


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


class IsolatedPool:
    """`call(msg, timeout_s)` on one of `workers` spawned processes running `main(conn, *args)` (thread-safe;
    callers block on a free worker). The worker loop answers each message with one reply and ends on None.
    `ready`: a worker with costly startup sends this message first; its first item waits up to `startup_s` for
    it before the item's own timeout starts (startup is not charged to the item)."""

    def __init__(self, main: Callable[..., None], args: tuple = (), workers: int = 1, name: str = "mmpipe-worker",
                 ready: Any = None, startup_s: float = 60.0):
        if workers < 1:
            raise ValueError("an IsolatedPool needs at least one worker")
        self._ready, self._startup_s = ready, startup_s
        # spawn, not fork: the parent runs gRPC / uvicorn threads, and a forked copy of them is not safe.
        self._ctx = mp.get_context("spawn")
        self._main, self._args, self._name = main, args, name
        self._idle: queue.Queue[_Worker] = queue.Queue()
        self._closed = False
        self.replaced = 0  # workers replaced after a crash or a hang (a gauge for tests and metrics)
        self._lock = threading.Lock()
        for _ in range(workers):
            self._idle.put(self._spawn())

    @property
    def closed(self) -> bool:
        return self._closed

    def _spawn(self) -> _Worker:
        return _Worker(self._ctx, self._main, self._args, self._name, ready=self._ready is None)

    def call(self, msg: Any, timeout_s: float) -> Any:
        """The worker's reply to `msg`. WorkerFault when the worker died on it, ran past `timeout_s` (both input
        faults unless the death was a signal from outside) or could not be reached."""
        if self._closed:
            raise WorkerFault("gone", "the worker pool is shut down")
        w = self._idle.get()
        while _exited(w.proc):  # died while idle (killed from outside): replaced before it costs an item
            self._replace(w)
            w = self._idle.get()
        healthy = False
        try:
            if not w.ready:
                self._await_ready(w)
            try:
                w.conn.send(msg)
            except (OSError, ValueError, BrokenPipeError):
                raise WorkerFault("gone", "the worker was unavailable") from None
            if not w.conn.poll(timeout_s):
                raise WorkerFault("timeout", f"took longer than {timeout_s:g} s and was stopped")
            try:
                reply = w.conn.recv()
            except (EOFError, OSError):
                raise self._death(w) from None
            healthy = True
        finally:
            if healthy:
                self._idle.put(w)
            else:
                self._replace(w)
        return reply

    def _await_ready(self, w: _Worker) -> None:
        try:
            said = w.conn.recv() if w.conn.poll(self._startup_s) else None
        except (EOFError, OSError):
            said = None
        if said != self._ready:
            raise WorkerFault("gone", f"the worker did not start within {self._startup_s:g} s")
        w.ready = True

    @staticmethod
    def _death(w: _Worker) -> WorkerFault:
        code = _exit_code(w.proc, 5.0)
        if code is not None and code < 0 and -code in {int(s) for s in INPUT_SIGNALS}:
            name = signal.Signals(-code).name
            why = "used more CPU time than allowed" if -code == signal.SIGXCPU else f"crashed ({name})"
            return WorkerFault("crash", why)
        return WorkerFault("gone", f"the worker exited unexpectedly (exit code {code})")

    def _replace(self, w: _Worker) -> None:
        w.stop(kill=True)
        with self._lock:
            self.replaced += 1
        if not self._closed:
            self._idle.put(self._spawn())

    def close(self) -> None:
        self._closed = True
        while True:
            try:
                w = self._idle.get_nowait()
            except queue.Empty:
                return
            w.stop()
