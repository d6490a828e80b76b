"""TPGroup: one rank's view of the tensor-parallel process group, and the collectives the sharded forward runs.

A process group object of its own (`ProcessGroupGloo` / `ProcessGroupNCCL` over a `TCPStore` on 127.0.0.1), not
`torch.distributed`'s global default group, so one process may hold several engines and a test may start and
stop them. Gloo on the CPU, NCCL on CUDA (NVLink multicast off: `NCCL_NVLS_ENABLE=0`, set before the group is
made). Every collective waits at most `timeout_s`; a peer that died makes it raise at once (gloo: "Connection
closed by peer"), never hang.

The sharded forward's collectives: `all_reduce` after each row-parallel projection and after the masked
embedding lookup, `gather_logits` (an all-gather of the vocabulary shards; only rank 0 keeps the result, for
sampling), `broadcast` of the step's multimodal rows from rank 0, `min_int` once at start-up (KV blocks).
"""
from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist

from .sharding import TPLayout


def _timeout(seconds: float) -> datetime.timedelta:
    return datetime.timedelta(seconds=seconds)


def make_store(size: int, timeout_s: float) -> dist.TCPStore:
    """Rank 0's store on a free 127.0.0.1 port (the OS picks it: no race with another engine); `.port` names it."""
    return dist.TCPStore("127.0.0.1", 0, size, True, timeout=_timeout(timeout_s), wait_for_workers=False)


class TPGroup:
    def __init__(self, rank: int, size: int, store: dist.Store, device: torch.device, timeout_s: float):
        self.rank, self.size, self.device = rank, size, device
        td = _timeout(timeout_s)
        if device.type == "cuda":
            os.environ["NCCL_NVLS_ENABLE"] = "0"  # read when NCCL builds its communicator
            opts = dist.ProcessGroupNCCL.Options()
            opts._timeout = td
            self.pg = dist.ProcessGroupNCCL(store, rank, size, opts)
        else:
            opts = dist.ProcessGroupGloo._Options()
            opts._timeout = td
            opts._devices = [dist.ProcessGroupGloo.create_device(hostname="127.0.0.1")]
            self.pg = dist.ProcessGroupGloo(store, rank, size, opts)

    @classmethod
    def join(cls, rank: int, size: int, port: int, device: torch.device, timeout_s: float) -> "TPGroup":
        """A worker's side: connect to rank 0's store, then build the group (blocks until every rank is in)."""
        store = dist.TCPStore("127.0.0.1", port, size, False, timeout=_timeout(timeout_s))
        return cls(rank, size, store, device, timeout_s)

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over the ranks, in place."""
        self.pg.allreduce([t]).wait()
        return t

    def broadcast(self, t: torch.Tensor) -> torch.Tensor:
        """Rank 0's `t` into every rank's `t` (same shape and dtype), in place."""
        self.pg.broadcast(t, 0).wait()
        return t

    def min_int(self, value: int) -> int:
        t = torch.tensor([value], dtype=torch.int64, device=self.device)
        self.pg.allreduce([t], dist.ReduceOp.MIN).wait()
        return int(t.item())

    def gather_logits(self, local: torch.Tensor, layout: TPLayout) -> torch.Tensor | None:
        """(R, vocab) logits on rank 0 from each rank's (R, vocab_per_rank) shard; None on the other ranks."""
        local = local.contiguous()
        parts = [torch.empty_like(local) for _ in range(self.size)]
        self.pg.allgather([parts], [local]).wait()
        if self.rank:
            return None
        return torch.cat(parts, dim=-1)[:, :layout.vocab_size]

    def embed(self, embed_tokens: torch.nn.Module, ids: torch.Tensor, layout: TPLayout) -> torch.Tensor:
        """Vocab-parallel lookup: each rank embeds the ids in its rows (zeros elsewhere), then one all-reduce."""
        local = ids - layout.vocab_start
        outside = (local < 0) | (local >= layout.vocab_stop - layout.vocab_start)
        h = embed_tokens(local.masked_fill(outside, 0))
        h.masked_fill_(outside.unsqueeze(-1), 0)
        return self.all_reduce(h)


class TPShard:
    """What the decoder and the runner of one rank need: its layout and its group."""

    def __init__(self, layout: TPLayout, group: TPGroup):
        self.layout, self.group = layout, group

    @property
    def rank(self) -> int:
        return self.layout.rank
