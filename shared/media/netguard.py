"""Which network addresses a media fetch may connect to, and a connection that goes exactly there (SSRF guard).

Owns: classifying an IP address (loopback, private, link-local, CGNAT, multicast, unspecified, cloud
metadata, reserved, and the IPv6 forms that embed an IPv4 address: IPv4-mapped, IPv4-compatible, 6to4,
NAT64, Teredo), parsing the odd IPv4 spellings that `inet_aton` accepts (`2130706433`, `0x7f.1`,
`0177.0.0.1`, `127.1`), and `GuardedBackend`: an httpcore network backend that resolves a host ONCE,
checks EVERY resolved address, connects to the checked IP (the request keeps its Host header and TLS
SNI / certificate name, which httpcore takes from the URL) and verifies the peer of the socket it opened.
Because the name is never resolved a second time, there is no DNS-rebinding window between check and
connect, on the first URL and on every redirect hop alike.
Must not: decode media, read environment variables, or talk to any address it has not checked.
"""
from __future__ import annotations

import contextlib
import ipaddress
import socket
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass

import httpcore

from ..errors import MediaPolicyError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# Instance metadata services: credentials live behind these. They stay refused even with the private-network
# opt-in: no trusted deployment serves media from them.
METADATA_ADDRESSES = frozenset(ipaddress.ip_address(a) for a in (
    "169.254.169.254",   # AWS, GCP, Azure, OpenStack, DigitalOcean, ...
    "169.254.170.2",     # AWS ECS task metadata / credentials
    "169.254.169.253",   # AWS VPC DNS
    "169.254.169.123",   # AWS time sync
    "fd00:ec2::254",     # AWS IMDS over IPv6
    "fd00:ec2::23",      # AWS IPv6 DNS
    "100.100.100.200",   # Alibaba Cloud
    "192.0.0.192",       # Oracle Cloud
))
_CGNAT = ipaddress.ip_network("100.64.0.0/10")
_NAT64 = (ipaddress.ip_network("64:ff9b::/96"), ipaddress.ip_network("64:ff9b:1::/48"))
_V4COMPAT = ipaddress.ip_network("::/96")

OPT_IN_HINT = ("Trusted deployments that must fetch from internal hosts can allow private addresses with "
               "--allow-private-media-urls (env MMPIPE_MEDIA_ALLOW_PRIVATE_NETWORKS=1)")


# ----------------------------------------------------------------------------------------- parsing

def _legacy_ipv4(host: str) -> ipaddress.IPv4Address | None:
    """The address `inet_aton` would read from `host` (1-4 dot-separated decimal, 0-octal or 0x-hex parts,
    the last part filling the remaining bytes), or None. `2130706433`, `0x7f.1` and `0177.0.0.1` are all
    127.0.0.1 to the C resolver, so they must be to us too."""
    parts = host.split(".")
    if not 1 <= len(parts) <= 4:
        return None
    vals: list[int] = []
    for p in parts:
        if not p:
            return None
        try:
            if p[:2].lower() == "0x":
                v = int(p[2:], 16) if p[2:] else 0
            elif len(p) > 1 and p[0] == "0":
                v = int(p[1:], 8)
            else:
                if not p.isdigit():
                    return None
                v = int(p, 10)
        except ValueError:
            return None
        vals.append(v)
    *head, last = vals
    if any(v > 255 for v in head) or last >= 256 ** (4 - len(head)):
        return None
    n = 0
    for v in head:
        n = n * 256 + v
    n = n * 256 ** (4 - len(head)) + last
    return ipaddress.IPv4Address(n)


def parse_ip_host(host: str) -> IPAddress | None:
    """The IP address a URL host denotes (IPv6 literal with or without brackets and zone, canonical or
    legacy IPv4 spelling), or None for a DNS name."""
    h = host.strip().lower().rstrip(".")
    if h.startswith("[") and h.endswith("]"):
        h = h[1:-1]
    h = h.split("%", 1)[0]  # IPv6 zone id ("fe80::1%eth0", "%25" in URLs): the address is what matters
    try:
        return ipaddress.ip_address(h)
    except ValueError:
        pass
    return _legacy_ipv4(h)


# ------------------------------------------------------------------------------------ classification

def embedded_ipv4(ip: IPAddress) -> tuple[ipaddress.IPv4Address, str] | None:
    """(IPv4 address, form) for IPv6 addresses that carry one; None otherwise."""
    if not isinstance(ip, ipaddress.IPv6Address):
        return None
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped, "IPv4-mapped IPv6"
    if ip in _V4COMPAT and int(ip) > 1:  # "::a.b.c.d" (deprecated); :: and ::1 are classified as such
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF), "IPv4-compatible IPv6"
    if ip.sixtofour is not None:
        return ip.sixtofour, "6to4"
    if any(ip in n for n in _NAT64):
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF), "NAT64"
    if ip.teredo is not None:
        return ip.teredo[1], "Teredo"
    return None


def address_class(ip: IPAddress) -> str | None:
    """Why `ip` is not a public unicast address ("loopback", "cloud metadata endpoint", ...), or None if it is."""
    emb = embedded_ipv4(ip)
    if emb is not None:
        inner = address_class(emb[0])
        if inner is not None:
            return f"{inner}, {emb[1]} form of {emb[0]}"
        if emb[1] == "IPv4-compatible IPv6":
            return "deprecated IPv4-compatible IPv6"
        if emb[1] == "IPv4-mapped IPv6":
            return None  # the connection goes to the (public) IPv4 address itself
    if ip in METADATA_ADDRESSES:
        return "cloud metadata endpoint"
    if ip.is_unspecified:
        return "unspecified"
    if ip.is_loopback:
        return "loopback"
    if ip.is_link_local:
        return "link-local"
    if ip.is_multicast:
        return "multicast"
    if isinstance(ip, ipaddress.IPv4Address) and ip in _CGNAT:
        return "carrier-grade NAT (100.64.0.0/10)"
    if isinstance(ip, ipaddress.IPv6Address) and ip.is_site_local:
        return "site-local"
    if ip.is_private:
        return "private"
    if ip.is_reserved:
        return "reserved"
    if emb is None and not ip.is_global:
        return "special-purpose (not globally routable)"
    if isinstance(ip, ipaddress.IPv4Address) and ip.packed[0] == 192 and ip.packed[1:3] == b"\0\0":
        return "special-purpose (192.0.0.0/24)"  # IETF protocol assignments; Python calls some "global"
    return None


def check_address(ip: IPAddress, *, allow_private: bool, host: str | None = None) -> None:
    """MediaPolicyError (403) when `ip` may not be connected to under the policy."""
    cls = address_class(ip)
    if cls is None:
        return
    if allow_private and not cls.startswith("cloud metadata"):
        return
    if host and parse_ip_host(host) is None:
        name = f"host {host!r} resolves to {ip}"
    elif host and host.strip("[]").lower() != str(ip):
        name = f"host {host!r} means {ip}"
    else:
        name = f"address {ip}"
    if cls.startswith("cloud metadata"):
        raise MediaPolicyError(f"media URL refused: {name} ({cls}); instance metadata services are never "
                               f"fetched, even with --allow-private-media-urls")
    raise MediaPolicyError(f"media URL refused: {name} ({cls}), not a public address; media may only be "
                           f"fetched from public addresses. {OPT_IN_HINT}")


# ------------------------------------------------------------------------------------------ resolver

_resolver_pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="mmpipe-dns")


def system_resolve(host: str, port: int) -> list[str]:
    """Every address the system resolver gives for `host` (TCP), in its preference order."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    return [str(info[4][0]) for info in infos]


def _direct(ip: str, port: int) -> tuple[str, int]:
    return ip, port


@dataclass
class Network:
    """How names are resolved and where a checked address is dialled. Production: the system resolver and
    the address itself. Tests swap in a fake resolver (and a `route` that maps a pretend public address to
    a 127.0.0.1 test server, so no test traffic ever leaves the machine) with `override_network`."""

    resolve: Callable[[str, int], list[str]] = system_resolve
    route: Callable[[str, int], tuple[str, int]] = _direct


_network = Network()
_generation = 0  # bumped on every override: fetch.py keys its pooled clients on it
_lock = threading.Lock()


def current_network() -> tuple[Network, int]:
    return _network, _generation


@contextlib.contextmanager
def override_network(resolve: Callable[[str, int], list[str]] | None = None,
                     route: Callable[[str, int], tuple[str, int]] | None = None) -> Iterator[Network]:
    """Test hook: resolve names with `resolve` and dial checked addresses through `route`."""
    global _network, _generation
    with _lock:
        saved = _network
        _network = Network(resolve=resolve or saved.resolve, route=route or saved.route)
        _generation += 1
    try:
        yield _network
    finally:
        with _lock:
            _network = saved
            _generation += 1


def resolve_checked(host: str, port: int, *, allow_private: bool, timeout: float | None,
                    network: Network) -> list[IPAddress]:
    """Resolve `host` ONCE and check every address; refuse the host if ANY answer is not allowed (a name
    that mixes public and private answers is a rebinding trick, not a mirror)."""
    ip = parse_ip_host(host)
    if ip is not None:
        addrs: list[IPAddress] = [ip]
    else:
        fut = _resolver_pool.submit(network.resolve, host, port)
        try:
            raw = fut.result(timeout=timeout)
        except FutureTimeout:
            raise httpcore.ConnectTimeout(f"resolving {host!r} timed out") from None
        except (OSError, UnicodeError) as e:
            raise httpcore.ConnectError(f"cannot resolve host {host!r}: {e}") from None
        addrs = []
        for a in raw:
            try:
                addrs.append(ipaddress.ip_address(str(a).split("%", 1)[0]))
            except ValueError:
                raise httpcore.ConnectError(f"resolver returned a malformed address {a!r} for {host!r}") from None
        if not addrs:
            raise httpcore.ConnectError(f"host {host!r} has no addresses")
    for a in addrs:
        check_address(a, allow_private=allow_private, host=host)
    return addrs


class GuardedBackend(httpcore.SyncBackend):
    """An httpcore backend that only ever opens sockets to addresses `check_address` allowed."""

    def __init__(self, *, allow_private: bool, network: Network):
        self.allow_private = allow_private
        self.network = network

    def connect_tcp(self, host: str, port: int, timeout: float | None = None, local_address: str | None = None,
                    socket_options=None) -> httpcore.NetworkStream:
        addrs = resolve_checked(host, port, allow_private=self.allow_private, timeout=timeout,
                                network=self.network)
        last: Exception | None = None
        for ip in addrs:
            # Dial the checked IP literal: create_connection does no DNS for a numeric host.
            target = ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped else ip
            dial_ip, dial_port = self.network.route(str(target), port)
            try:
                stream = super().connect_tcp(dial_ip, dial_port, timeout=timeout, local_address=local_address,
                                             socket_options=socket_options)
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as e:
                last = e
                continue
            self._verify_peer(stream, dial_ip, host)
            return stream
        assert last is not None
        raise last

    def _verify_peer(self, stream: httpcore.NetworkStream, dialled: str, host: str) -> None:
        # Belt and braces: whatever the socket actually reached must be the address we checked.
        sock = stream.get_extra_info("socket")
        try:
            peer = ipaddress.ip_address(sock.getpeername()[0].split("%", 1)[0])
        except (OSError, ValueError, AttributeError, IndexError):
            stream.close()
            raise httpcore.ConnectError(f"cannot read the peer address of the connection to {host!r}") from None
        mapped = peer.ipv4_mapped if isinstance(peer, ipaddress.IPv6Address) else None
        if (mapped or peer) != ipaddress.ip_address(dialled):
            stream.close()
            raise MediaPolicyError(f"media connection to {host!r} reached {peer}, not the checked address "
                                   f"{dialled}; refused")
        if self.network.route is _direct:  # production routing: re-check the peer itself
            try:
                check_address(mapped or peer, allow_private=self.allow_private, host=host)
            except MediaPolicyError:
                stream.close()
                raise
