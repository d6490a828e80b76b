"""Tensor-parallel worker processes: rank 0 (the engine's own process, or the engine-core process) starts ranks
1..N-1, sends each of them every step's staged inputs, and supervises them; `worker_main` is a worker's life.

    rank 0 (LLMEngine)                               rank r (worker_main)
    TPWorkers.start: store on a free port, spawn --->  "started"; join the group; load its shard
    join the group; load its own shard               ModelRunner(shard, tp): KV cache of its heads
    ModelRunner: min KV blocks over ranks <--------> (the same all-reduce)
    wait for "ready" <------------------------------ "ready"
    each step: schedule, stage, send the StepPlan -->  recv, run_plan: the same forward on its shard
    run_plan (collectives with every rank) <-------->  (logits: gathered to rank 0, which samples)
    stop: "stop", join, then terminate / kill -----> exit

The step plan travels over one pipe per worker, not a collective: an idle engine sends nothing, and a worker
waits on its pipe without a timeout (its EOF means rank 0 is gone: it exits); the tensors a step moves (the
multimodal rows) go through the group's broadcast inside the step, where every rank is present and the
collective timeout means a hang. A worker that dies is noticed before each step (its exit code) or during one
(the collective raises as its peer closes): `EngineWorkerError` names the rank, its exit code and its error.
Multiprocessing's spawn start method (CUDA and threads make fork unsafe); `NCCL_NVLS_ENABLE=0` in every worker.
"""
from __future__ import annotations

import atexit
import dataclasses
import logging
import multiprocessing as mp
import os
import signal
import time
from dataclasses import dataclass
from multiprocessing.reduction import ForkingPickler
from typing import Any

import torch

from mmpipe.shared.errors import EngineWorkerError

from .group import TPGroup, make_store
from .sharding import ShardSource, TPLayout, load_lm_shard

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerArgs:
    rank: int
    size: int
    port: int
    source: ShardSource
    config: Any                # EngineConfig (its tokenizer left out: workers never sample)
    cpu_threads: int           # torch threads of a CPU worker (the ranks share the host's cores)


def rank_device(config: Any, rank: int) -> torch.device:
    """cuda:(base + rank) on CUDA, where base is rank 0's index; the CPU for every rank otherwise."""
    dev = torch.device(config.device)
    if dev.type != "cuda":
        return dev
    return torch.device("cuda", (dev.index or 0) + rank)


class TPWorkers:
    """Rank 0's handle on ranks 1..N-1 (see the module docstring)."""

    def __init__(self, config: Any, source: ShardSource):
        self.size = config.tensor_parallel_size
        self.timeout_s = float(config.distributed_timeout_s)
        self.dead: str | None = None
        self._stopped = False
        self.store = make_store(self.size, self.timeout_s)
        ctx = mp.get_context("spawn")
        wcfg = dataclasses.replace(config, tokenizer=None)
        threads = max(1, torch.get_num_threads() // self.size)
        self.procs, self.conns = [], []
        for rank in range(1, self.size):
            parent, child = ctx.Pipe(duplex=True)
            src = dataclasses.replace(source, device=str(rank_device(config, rank)))
            proc = ctx.Process(target=worker_main, name=f"mmpipe-tp-worker-{rank}",
                               args=(WorkerArgs(rank, self.size, self.store.port, src, wcfg, threads), child))
            proc.start()
            child.close()  # only the worker holds its end: its exit is our EOF
            self.procs.append(proc)
            self.conns.append(parent)
        atexit.register(self.stop)  # before multiprocessing's exit hook, which would wait for them forever
        try:
            self._await("started", config.distributed_timeout_s)
            self.group = TPGroup(0, self.size, self.store, rank_device(config, 0), self.timeout_s)
        except BaseException:
            self.stop()
            raise

    # ---- start-up --------------------------------------------------------------------------------------------
    def _await(self, what: str, timeout_s: float) -> None:
        """Wait for message `what` from every worker; a worker that exits or reports a failure first raises."""
        deadline = time.monotonic() + timeout_s
        for rank, (proc, conn) in enumerate(zip(self.procs, self.conns), start=1):
            while True:
                if conn.poll(0.05):
                    try:
                        kind, body = conn.recv()
                    except EOFError:
                        raise self._died(rank, "closed its pipe") from None
                    if kind == what:
                        break
                    if kind == "failed":
                        raise self._died(rank, body)
                elif not proc.is_alive():
                    raise self._died(rank, "exited")
                if time.monotonic() > deadline:
                    raise self._died(rank, f"sent no {what!r} within {timeout_s:.0f} s")

    def wait_ready(self) -> None:
        self._await("ready", self.timeout_s)

    # ---- steps -----------------------------------------------------------------------------------------------
    def send_step(self, plan: Any) -> None:
        self.check()
        msg = ForkingPickler.dumps(("step", plan))  # pickled once for every worker (their recv() unpickles)
        for rank, conn in enumerate(self.conns, start=1):
            try:
                conn.send_bytes(msg)
            except (BrokenPipeError, ConnectionResetError, OSError):
                raise self._died(rank, "closed its pipe") from None

    def check(self) -> None:
        """Raise EngineWorkerError if the engine lost a worker (now or before)."""
        if self.dead is not None:
            raise EngineWorkerError(self.dead)
        for rank, proc in enumerate(self.procs, start=1):
            if not proc.is_alive():
                raise self._died(rank, "exited")

    def failure(self, exc: BaseException) -> BaseException:
        """What a collective's error means: a worker's death (given a moment to be seen), or `exc` itself."""
        if self.dead is not None:
            return EngineWorkerError(self.dead)
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:
            for rank, proc in enumerate(self.procs, start=1):
                if not proc.is_alive() or self.conns[rank - 1].poll():
                    return self._died(rank, f"failed during a step ({exc})")
            time.sleep(0.05)
        return exc

    def _died(self, rank: int, what: str) -> EngineWorkerError:
        proc, conn = self.procs[rank - 1], self.conns[rank - 1]
        detail = ""
        try:
            while conn.poll():
                kind, body = conn.recv()
                if kind == "failed":
                    detail = f": {body}"
        except (EOFError, OSError):
            pass
        proc.join(0.5)
        code = proc.exitcode
        self.dead = (f"tensor-parallel worker rank {rank} (pid {proc.pid}) {what}"
                     f"{'' if code is None else f', exit code {code}'}{detail}")
        log.error("%s; the engine cannot step any more", self.dead)
        self.stop()
        return EngineWorkerError(self.dead)

    # ---- shutdown --------------------------------------------------------------------------------------------
    def stop(self, timeout_s: float = 10.0) -> None:
        """Ask every worker to exit, then terminate (and kill) the ones still alive. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        atexit.unregister(self.stop)
        for conn in self.conns:
            try:
                conn.send(("stop", None))
            except (BrokenPipeError, ConnectionResetError, OSError):
                pass
        deadline = time.monotonic() + timeout_s
        for proc in self.procs:
            proc.join(max(0.0, deadline - time.monotonic()))
            if proc.is_alive():
                proc.terminate()
                proc.join(2.0)
            if proc.is_alive():
                proc.kill()
                proc.join()
        for conn in self.conns:
            conn.close()


def start_rank0(hf_model: Any, config: Any) -> tuple[TPWorkers, Any, Any]:
    """Start the workers and build rank 0's shard: (workers, rank 0's shard model, its TPShard).

    `hf_model` already holding rank 0's shard (`mmpipe_tp_layout`, what load_lm_shard returns) is used as it is;
    any other model only names the checkpoint (its LM weights are never read, and may be on the meta device)."""
    from .group import TPShard
    from .sharding import shard_source_of

    source = shard_source_of(hf_model, config)
    workers = TPWorkers(config, source)
    try:
        layout: TPLayout | None = getattr(hf_model, "mmpipe_tp_layout", None)
        if layout is not None and layout.rank == 0 and layout.size == config.tensor_parallel_size:
            shard = hf_model
        else:
            shard = load_lm_shard(source, 0, config.tensor_parallel_size)
        return workers, shard, TPShard(shard.mmpipe_tp_layout, workers.group)
    except BaseException:
        workers.stop()
        raise


def worker_main(args: WorkerArgs, conn: Any) -> None:
    """A worker's whole life (multiprocessing target): join, load, then run every step rank 0 sends. It leaves
    through `os._exit`: a normal interpreter exit would first tear down the process group, which waits on
    its peers (seconds, or for ever when rank 0 is gone)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the process group: rank 0 decides
    os.environ["NCCL_NVLS_ENABLE"] = "0"
    from ..model_runner import ModelRunner
    from .group import TPShard

    dev = torch.device(args.source.device)
    if dev.type == "cpu":
        torch.set_num_threads(args.cpu_threads)
    else:
        torch.cuda.set_device(dev)
    code = 0
    try:
        t0 = time.perf_counter()
        conn.send(("started", os.getpid()))
        group = TPGroup.join(args.rank, args.size, args.port, dev, args.config.distributed_timeout_s)
        t1 = time.perf_counter()
        model = load_lm_shard(args.source, args.rank, args.size)
        runner = ModelRunner(model, args.config, tp=TPShard(model.mmpipe_tp_layout, group))
        log.info("tensor-parallel rank %d/%d ready: joined in %.1f s, shard loaded in %.1f s, %d KV blocks",
                 args.rank, args.size, t1 - t0, time.perf_counter() - t1, runner.num_blocks)
        conn.send(("ready", runner.num_blocks))
        while True:
            try:
                kind, body = conn.recv()
            except EOFError:  # rank 0 is gone
                break
            if kind == "stop":
                break
            runner.run_plan(body)
    except BaseException as e:  # noqa: BLE001 - reported to rank 0, which names it in its EngineWorkerError
        code = 1
        log.exception("tensor-parallel worker rank %d failed", args.rank)
        try:
            conn.send(("failed", f"{type(e).__name__}: {e}"))
        except OSError:
            pass
    logging.shutdown()
    os._exit(code)
