"""Turn a media reference (http(s) URL, data: URL, file:// URL or local path) into bytes, under a policy.

Owns: every byte that enters mmpipe from a URL or the local disk: the domain allow-list (checked on
EVERY redirect hop, redirects followed manually), the private-address (SSRF) refusal on the address each
hop actually connects to (netguard.py), the byte cap (enforced while streaming, not after),
the overall fetch deadline, and the local-folder confinement (realpath + post-open re-check).
Must not: decode media, cache anything, or talk to any host the policy does not allow.
"""
from __future__ import annotations

import base64
import binascii
import os
import stat
import threading
import time
import urllib.parse

import httpcore
import httpx

from ..errors import InvalidInputError, MediaFetchError, MediaPolicyError, MediaTimeoutError
from .netguard import GuardedBackend, check_address, current_network, parse_ip_host
from .policy import MediaPolicy, normalize_host

_REDIRECT_CODES = (301, 302, 303, 307, 308)

_clients: dict[tuple[bool, int], httpx.Client] = {}
_client_lock = threading.Lock()


class _GuardedTransport(httpx.HTTPTransport):
    """httpx's transport with its connection pool dialling through `netguard.GuardedBackend`: every socket
    goes to an address resolved once and checked (no DNS-rebinding window), whatever the hop."""

    def __init__(self, backend: GuardedBackend):
        super().__init__(trust_env=False)
        ssl_context = self._pool._ssl_context  # httpx's default verified context (certifi), SNI = URL host
        self._pool.close()
        self._pool = httpcore.ConnectionPool(ssl_context=ssl_context, max_connections=100,
                                             max_keepalive_connections=20, keepalive_expiry=5.0,
                                             network_backend=backend)


def _get_client(policy: MediaPolicy) -> httpx.Client:
    """One pooled client per private-network setting (httpx.Client is thread-safe); never follows redirects.

    Pooled connections are reused only under the same setting, so a socket opened to a private address for
    a trusting caller can never serve a strict one. trust_env=False: HTTP(S)_PROXY / netrc from the
    environment must not silently route media fetches (and their URLs' credentials) through a third party,
    nor hand the address check to a proxy.
    """
    network, gen = current_network()
    key = (policy.allow_private_networks, gen)
    client = _clients.get(key)
    if client is None:
        with _client_lock:
            client = _clients.get(key)
            if client is None:
                for k in [k for k in _clients if k[1] != gen]:  # a test override ended or began
                    _clients.pop(k).close()
                backend = GuardedBackend(allow_private=policy.allow_private_networks, network=network)
                client = httpx.Client(follow_redirects=False, trust_env=False,
                                      transport=_GuardedTransport(backend),
                                      headers={"Accept-Encoding": "identity", "User-Agent": "mmpipe-media/0.1"})
                _clients[key] = client
    return client


def redact_url(url: str | httpx.URL) -> str:
    """URL for error messages: no userinfo, no query/fragment (signed URLs carry secrets there)."""
    try:
        u = httpx.URL(str(url))
        port = f":{u.port}" if u.port else ""
        host = u.host if ":" not in u.host else f"[{u.host}]"
        return f"{u.scheme}://{host}{port}{u.path}"
    except Exception:
        return str(url)[:80]


def fetch_bytes(url: str, policy: MediaPolicy, modality: str | None = None) -> bytes:
    """Return the bytes behind `url` (http(s), data:, file:// or a local path), enforcing `policy`."""
    if not isinstance(url, str) or not url.strip():
        raise InvalidInputError("media URL must be a non-empty string")
    url = url.strip()
    try:
        scheme = urllib.parse.urlsplit(url).scheme.lower()
    except ValueError as e:  # "http://[" -> "Invalid IPv6 URL": the client's fault, not a 500
        raise InvalidInputError(f"malformed media URL {url[:80]!r}: {e}") from None
    if scheme in ("http", "https"):
        return _fetch_http(url, policy, modality)
    if scheme == "data":
        return _fetch_data_url(url, policy)
    if scheme == "file":
        return _read_local(_file_url_to_path(url), policy)
    if scheme == "":
        return _read_local(url, policy)
    raise MediaPolicyError(
        f"unsupported media URL scheme {scheme!r}: use http(s)://, data: (base64) or file:// "
        f"(file:// needs --allowed-local-media-path)")


# ---------------------------------------------------------------------------------------------- http(s)

def _check_hop(u: httpx.URL, policy: MediaPolicy, *, hop: int) -> None:
    where = "redirect target" if hop else "URL"
    if u.scheme not in ("http", "https"):
        # A redirect to file:// or data: would bypass the local-path policy: only http(s) hops.
        raise MediaPolicyError(f"{where} {redact_url(u)} uses scheme {u.scheme!r}; only http(s) may be "
                               f"fetched over the network")
    host = normalize_host(u.host)
    if not host:
        raise InvalidInputError(f"media {where} {redact_url(u)} has no host")
    if not policy.host_allowed(host):
        raise MediaPolicyError(
            f"media {where} host {host!r} is not in the allowed media domains "
            f"{list(policy.allowed_media_domains or ())}; add it to --allowed-media-domains "
            f"(exact host or a parent domain) if it should be allowed")
    ip = parse_ip_host(host)
    if ip is not None:
        # IP literals (any spelling, IPv4 embedded in IPv6 included) are refused before connecting; names
        # are checked on the addresses they resolve to, at connect time (netguard.GuardedBackend).
        check_address(ip, allow_private=policy.allow_private_networks, host=host)


def _fetch_http(url: str, policy: MediaPolicy, modality: str | None) -> bytes:
    try:
        u = httpx.URL(url)
    except Exception as e:  # httpx.InvalidURL and friends
        raise InvalidInputError(f"malformed media URL {url[:80]!r}: {e}") from None
    # One deadline for the whole fetch (all hops + body): httpx timeouts are per operation, so a server
    # that drips one byte per second would otherwise never time out.
    deadline = time.monotonic() + policy.fetch_timeout(modality)
    client = _get_client(policy)
    for hop in range(policy.max_redirects + 1):
        _check_hop(u, policy, hop=hop)  # checked BEFORE connecting, for the first URL and every redirect
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise _timeout(u, policy, modality)
        try:
            with client.stream("GET", u, timeout=httpx.Timeout(remaining)) as resp:
                if resp.status_code in _REDIRECT_CODES:
                    loc = resp.headers.get("location")
                    if not loc:
                        raise MediaFetchError(f"{redact_url(u)} answered HTTP {resp.status_code} without a "
                                              f"Location header")
                    try:
                        nxt = u.join(loc)
                    except Exception:  # httpx.InvalidURL is not an HTTPError: map it here, not as a 500
                        raise MediaFetchError(f"{redact_url(u)} redirects to a malformed Location "
                                              f"{loc[:80]!r}") from None
                    if not policy.allow_redirects:
                        raise MediaPolicyError(
                            f"{redact_url(u)} redirects (HTTP {resp.status_code}) to {redact_url(nxt)}, and "
                            f"redirects are disabled (MMPIPE_MEDIA_URL_ALLOW_REDIRECTS=0 or "
                            f"VLLM_MEDIA_URL_ALLOW_REDIRECTS=0); use the final URL directly or enable redirects")
                    u = nxt
                    continue
                if resp.status_code >= 400:
                    hint = ("the media server failed; retry later" if resp.status_code >= 500
                            else "check the URL and that it is publicly readable")
                    raise MediaFetchError(
                        f"fetching {redact_url(u)} failed: the server answered HTTP {resp.status_code} "
                        f"{resp.reason_phrase}; {hint}")
                if resp.status_code != 200:
                    raise MediaFetchError(f"fetching {redact_url(u)}: unexpected HTTP {resp.status_code}")
                return _read_body(resp, u, policy, deadline, modality)
        except httpx.TimeoutException:
            raise _timeout(u, policy, modality) from None
        except httpx.InvalidURL as e:
            # `u` was checked, so this is the answer's Location: httpx builds the next request of a redirect even
            # when it does not follow it, and fails on `data:` / `mailto:` / `javascript:` targets (not HTTPError:
            # it escaped as a 500). Non-http(s) targets are refused like any other (403).
            raise MediaPolicyError(f"{redact_url(u)} redirects to a Location that is not an http(s) URL ({e}); "
                                   f"only http(s) redirect targets are followed") from None
        except httpx.HTTPError as e:
            raise MediaFetchError(f"fetching {redact_url(u)} failed: {type(e).__name__}: {e}") from None
    raise MediaFetchError(f"too many redirects (more than {policy.max_redirects}) starting at "
                          f"{redact_url(url)}; use the final URL directly")


def _timeout(u: httpx.URL, policy: MediaPolicy, modality: str | None) -> MediaTimeoutError:
    return MediaTimeoutError(
        f"fetching {redact_url(u)} took longer than {policy.fetch_timeout(modality):g} s; the server is too slow "
        f"or unreachable (raise {policy.fetch_timeout_env(modality)} if large media are expected)")


def _too_large(what: str, policy: MediaPolicy, size: int | None = None) -> MediaFetchError:
    got = f" ({size} bytes)" if size is not None else ""
    return MediaFetchError(
        f"{what} is larger than the media size cap of {policy.max_bytes} bytes{got}; send a smaller file "
        f"or raise MMPIPE_MEDIA_MAX_BYTES")


def _read_body(resp: httpx.Response, u: httpx.URL, policy: MediaPolicy, deadline: float,
               modality: str | None) -> bytes:
    cl = resp.headers.get("content-length")
    if cl is not None and cl.strip().isdigit() and int(cl) > policy.max_bytes:
        # Refuse up front: no point downloading what will be thrown away.
        raise _too_large(f"media at {redact_url(u)}", policy, int(cl))
    buf = bytearray()
    # iter_bytes counts DECODED bytes, so a gzip-encoded body cannot inflate past the cap unnoticed.
    for chunk in resp.iter_bytes():  # no chunk_size: httpx would buffer up to it before yielding
        buf += chunk
        if len(buf) > policy.max_bytes:
            raise _too_large(f"media at {redact_url(u)}", policy)
        if time.monotonic() > deadline:
            raise _timeout(u, policy, modality)
    return bytes(buf)


# ----------------------------------------------------------------------------------------------- data:

def _fetch_data_url(url: str, policy: MediaPolicy) -> bytes:
    head, sep, payload = url[5:].partition(",")
    if not sep:
        raise InvalidInputError("malformed data: URL (no ',' separating the header from the data); expected "
                                "data:<mime>;base64,<data>")
    is_b64 = any(p.strip().lower() == "base64" for p in head.split(";")[1:])
    # Cheap size check before decoding: base64 expands by 4/3, percent-encoding by up to 3x.
    approx = len(payload) * 3 // 4 if is_b64 else len(payload) // 3
    if approx > policy.max_bytes:
        raise _too_large("data: URL payload", policy, approx)
    if is_b64:
        data = b64decode_strict(urllib.parse.unquote(payload) if "%" in payload else payload,
                                what="data: URL")
    else:
        data = urllib.parse.unquote_to_bytes(payload)
    if len(data) > policy.max_bytes:
        raise _too_large("data: URL payload", policy, len(data))
    return data


def b64decode_strict(s: str, *, what: str, param: str | None = None) -> bytes:
    """Decode standard or URL-safe base64 (whitespace and missing padding tolerated); else InvalidInputError."""
    t = "".join(s.split())
    if "-" in t or "_" in t:
        t = t.replace("-", "+").replace("_", "/")
    t += "=" * (-len(t) % 4)
    try:
        return base64.b64decode(t, validate=True)
    except (binascii.Error, ValueError) as e:
        raise InvalidInputError(f"{what} is not valid base64 ({e})", param=param) from None


# ----------------------------------------------------------------------------------------------- local

def _file_url_to_path(url: str) -> str:
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError as e:
        raise InvalidInputError(f"malformed file:// URL {url[:80]!r}: {e}") from None
    if parts.netloc not in ("", "localhost"):
        raise MediaPolicyError(f"file:// URL names host {parts.netloc!r}; only local files "
                               f"(file:///abs/path) can be read")
    if parts.query or parts.fragment:
        raise InvalidInputError("file:// URL must not carry a query or fragment")
    return urllib.parse.unquote(parts.path)


def _inside(root: str, path: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def _read_local(path: str, policy: MediaPolicy) -> bytes:
    if policy.allowed_local_media_path is None:
        raise MediaPolicyError(
            f"local media path {path!r} refused: local files are disabled; start the server with "
            f"--allowed-local-media-path DIR to allow files inside DIR")
    root = os.path.realpath(policy.allowed_local_media_path)
    if not os.path.isdir(root):
        raise MediaPolicyError(f"--allowed-local-media-path {policy.allowed_local_media_path!r} is not an "
                               f"existing directory")
    if "\x00" in path:
        raise InvalidInputError("local media path contains a NUL byte")
    # Relative paths are taken relative to the allowed folder, never to the server's cwd.
    candidate = path if os.path.isabs(path) else os.path.join(root, path)
    # realpath resolves both '..' and symlinks, so an escape by either route lands outside `root`.
    real = os.path.realpath(candidate)
    if not _inside(root, real):
        # Never name where it resolves to (a symlink's target, e.g. a /proc/<pid>/... path) nor the server's
        # folder: the client learns only that its own path is refused.
        raise MediaPolicyError(
            f"local media path {path[:200]!r} resolves outside the allowed folder (via '..' or a symlink); only "
            f"files inside --allowed-local-media-path may be read")
    try:
        # O_NOFOLLOW + O_NONBLOCK: a symlink swapped in after the check fails instead of being followed, and
        # a FIFO cannot hang the open.
        fd = os.open(real, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise MediaFetchError(f"local media file {path!r} does not exist") from None
    except OSError as e:
        raise MediaFetchError(f"cannot open local media file {path!r}: {e.strerror}") from None
    try:
        # Re-check what was actually opened: closes the race where a parent folder is replaced by a
        # symlink between realpath() and open().
        proc = f"/proc/self/fd/{fd}"
        if os.path.exists(proc) and not _inside(root, os.path.realpath(proc)):
            raise MediaPolicyError(f"local media path {path[:200]!r} changed to point outside the allowed folder "
                                   f"while being opened")
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise MediaFetchError(f"local media path {path!r} is not a regular file")
        if st.st_size > policy.max_bytes:
            raise _too_large(f"local media file {path!r}", policy, st.st_size)
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(policy.max_bytes + 1)
        if len(data) > policy.max_bytes:  # the file grew after fstat
            raise _too_large(f"local media file {path!r}", policy)
        return data
    finally:
        os.close(fd)
