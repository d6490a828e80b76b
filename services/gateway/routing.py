"""Which generator replica serves a request: prefix-aware consistent hashing, session affinity or round robin.

With several generators (`--generator-addr a:1,b:2`), a request whose prompt starts like an earlier one should go
to the replica that already holds those KV blocks in its prefix cache, as vLLM's production-stack router
(`--routing-logic prefixaware`) and Dynamo's KV router do. Here:

* **keys**: the prompt's placeholders are expanded with the items' token counts (`shared/inputs/expand.py`, the
  generator's own expansion) and its first full blocks are keyed by the engine's chained block hash
  (`shared/engine/block_hash.prefix_keys`): token ids plus each media item's cache key (content hash, or the
  tenant-scoped UUID key) and offset. No positions (the gateway has no torch; M-RoPE positions follow from the
  same inputs), under a routing root of its own: the keys are only hashed onto replicas, never compared with the
  engine's.
* **choice**: rendezvous (highest-random-weight) hashing of the key of block min(n, --routing-prefix-blocks)
  over the replicas' addresses. Requests that share that many blocks land on the same replica; every gateway
  process (--api-server-count) and a restarted gateway agree without sharing state; adding or removing a replica
  moves only the prefixes that hashed to it.
* **saturation**: a replica with --routing-saturation-threshold Generate calls in flight from this gateway is
  saturated; the request goes to the least loaded replica instead (decision `fallback`). A prompt shorter than
  one block has no key and goes to the least loaded replica (`no_prefix`).

`session` hashes the --session-key header instead (least loaded without one); `roundrobin` rotates. A replica
whose call failed with UNAVAILABLE is left out for a few seconds (`mark_down`), so the core's one retry goes to
another. Pure Python, no torch, no gRPC: `StageClients` asks `pick` and holds the replica's in-flight count with
`hold`.
"""
from __future__ import annotations

import hashlib
import itertools
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from mmpipe.shared.engine.block_hash import prefix_keys, root_key
from mmpipe.shared.inputs.expand import expand_prompt

from .config import RoutingConfig, split_addrs
from .metrics import REPLICA_IN_FLIGHT, ROUTED, ROUTING_DECISIONS

__all__ = ["Route", "Router", "RoutingConfig", "split_addrs"]

_ROUTING_NAMESPACE = "mmpipe-gateway-routing:v1"
# A replica whose call failed with UNAVAILABLE is left out for this long (gRPC reconnects within 0.2-2 s), so the
# core's one retry goes elsewhere; its prefixes hash among the others meanwhile.
DOWN_S = 5.0


def _score(key: bytes, replica: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(key + replica, digest_size=8).digest(), "big")


@dataclass(frozen=True)
class Route:
    """The replica one request goes to, and why (a ROUTING_DECISIONS label)."""

    replica: int
    decision: str


class Router:
    """Picks a replica per Generate call and counts the calls in flight on each (this gateway process only)."""

    def __init__(self, replicas: Sequence[str], cfg: RoutingConfig, placeholder_ids: dict[str, int] | None = None,
                 model: str = ""):
        self.replicas = tuple(replicas)
        self.cfg = cfg
        self.placeholder_ids = dict(placeholder_ids or {})
        self.model = model
        self.in_flight = [0] * len(self.replicas)
        self.routed = [0] * len(self.replicas)
        self._ids = [r.encode() for r in self.replicas]
        self._root = root_key(_ROUTING_NAMESPACE, cfg.block_size, False)
        self._rr = itertools.count()
        self._down_until = [0.0] * len(self.replicas)

    # ---- the choice ----------------------------------------------------------------------------------
    def routing_key(self, prompt_token_ids: Sequence[int], refs: Sequence[Any]) -> bytes | None:
        """The key a prompt is hashed by: its block min(n, prefix_blocks)'s chained key (None: no full block).
        `refs`: the media items in prompt order per modality (`.modality`, `.num_tokens`, `.key`)."""
        need = self.cfg.prefix_blocks * self.cfg.block_size  # expansion only lengthens: this many ids suffice
        ids, _, _, spans = expand_prompt(prompt_token_ids[:need], refs, self.placeholder_ids,
                                         [r.key or None for r in refs])
        keys = prefix_keys(self._root, ids[:need], [(s.offset, s.length, s.key) for s in spans],
                           self.cfg.block_size, self.cfg.prefix_blocks)
        return keys[-1] if keys else None

    def owner(self, key: bytes) -> int:
        """The replica a key hashes to (rendezvous hashing over the replica addresses that are up)."""
        return max(self._up(), key=lambda i: _score(key, self._ids[i]))

    def least_loaded(self) -> int:
        """Fewest calls in flight among the replicas that are up; ties go to the one that got fewer so far."""
        return min(self._up(), key=lambda i: (self.in_flight[i], self.routed[i], i))

    def mark_down(self, replica: int) -> None:
        """`replica` answered UNAVAILABLE: route around it for DOWN_S seconds."""
        self._down_until[replica] = time.monotonic() + DOWN_S

    def _up(self) -> list[int]:
        now = time.monotonic()
        up = [i for i, t in enumerate(self._down_until) if t <= now]
        return up or list(range(len(self.replicas)))  # all down: try them all

    def pick(self, prompt_token_ids: Sequence[int], refs: Sequence[Any] = (), session: str | None = None) -> Route:
        """Choose a replica for one request and count the decision."""
        if len(self.replicas) == 1:
            return Route(0, "hit")  # nothing to decide, nothing counted
        route = self._choose(prompt_token_ids, refs, session)
        ROUTING_DECISIONS.labels(self.model, self.cfg.logic, route.decision).inc()
        return route

    def _choose(self, prompt_token_ids: Sequence[int], refs: Sequence[Any], session: str | None) -> Route:
        logic = self.cfg.logic
        if logic == "roundrobin":
            up = self._up()
            return Route(up[next(self._rr) % len(up)], "roundrobin")
        if logic == "session":
            key = hashlib.blake2b(session.encode(), digest_size=32).digest() if session else None
        else:
            key = self.routing_key(prompt_token_ids, refs)
        if key is None:
            return Route(self.least_loaded(), "no_prefix")
        home = self.owner(key)
        limit = self.cfg.saturation_threshold
        if limit and self.in_flight[home] >= limit:
            other = self.least_loaded()
            if self.in_flight[other] < self.in_flight[home]:
                return Route(other, "fallback")
        return Route(home, "hit")

    # ---- load ----------------------------------------------------------------------------------------
    @contextmanager
    def hold(self, replica: int) -> Iterator[None]:
        """Count one Generate call in flight on `replica` for as long as the block runs."""
        name = self.replicas[replica]
        self.in_flight[replica] += 1
        self.routed[replica] += 1
        ROUTED.labels(self.model, name).inc()
        REPLICA_IN_FLIGHT.labels(self.model, name).inc()
        try:
            yield
        finally:
            self.in_flight[replica] -= 1
            REPLICA_IN_FLIGHT.labels(self.model, name).dec()
