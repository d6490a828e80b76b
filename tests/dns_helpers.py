"""A tiny authoritative DNS server on 127.0.0.1 for tests: A records that a test changes while clients run.

gRPC's default resolver (c-ares) accepts a DNS server in the target's authority, `dns://127.0.0.1:PORT/name:port`,
so a channel can be pointed at this server without touching /etc/hosts or the system resolver. Answers carry
TTL 0 (nothing may cache them); AAAA and every other type get an empty NOERROR answer; unknown names NXDOMAIN.
Stdlib only, UDP only (answers for a few addresses never need TCP).
"""
from __future__ import annotations

import socket
import struct
import threading

__all__ = ["LocalDNS"]

_A, _IN = 1, 1


def _qname_end(msg: bytes, off: int) -> tuple[str, int]:
    labels = []
    while msg[off]:
        n = msg[off]
        labels.append(msg[off + 1:off + 1 + n].decode("ascii").lower())
        off += 1 + n
    return ".".join(labels), off + 1


class LocalDNS:
    """`with LocalDNS() as dns: dns.set("svc.test", ["127.0.0.1"]); target = dns.target("svc.test", port)`."""

    def __init__(self, host: str = "127.0.0.1"):
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._sock.bind((host, 0))
        self._sock.settimeout(0.2)
        self.address = self._sock.getsockname()
        self._records: dict[str, list[str]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.queries = 0
        self._thread = threading.Thread(target=self._serve, name="local-dns", daemon=True)

    def set(self, name: str, addresses: list[str]) -> None:
        with self._lock:
            self._records[name.lower().rstrip(".")] = list(addresses)

    def target(self, name: str, port: int) -> str:
        return f"dns://{self.address[0]}:{self.address[1]}/{name}:{port}"

    def _answer(self, query: bytes) -> bytes:
        qid, _flags, qdcount = struct.unpack(">HHH", query[:6])
        name, end = _qname_end(query, 12)
        qtype, _qclass = struct.unpack(">HH", query[end:end + 4])
        question = query[12:end + 4]
        with self._lock:
            addrs = self._records.get(name)
            self.queries += 1
        if addrs is None:  # NXDOMAIN, authoritative
            return struct.pack(">HHHHHH", qid, 0x8403, 1, 0, 0, 0) + question
        answers = b""
        count = 0
        if qtype == _A:
            for a in addrs:
                # name as a pointer to the question (offset 12), TTL 0
                answers += struct.pack(">HHHIH", 0xC00C, _A, _IN, 0, 4) + socket.inet_aton(a)
                count += 1
        return struct.pack(">HHHHHH", qid, 0x8400, 1, count, 0, 0) + question + answers

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                data, peer = self._sock.recvfrom(512)
            except socket.timeout:
                continue
            except OSError:
                return
            try:
                self._sock.sendto(self._answer(data), peer)
            except (IndexError, struct.error, UnicodeDecodeError, OSError):
                continue  # a malformed query gets no answer

    def __enter__(self) -> "LocalDNS":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(2)
        self._sock.close()
