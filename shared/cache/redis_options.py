"""How to reach the Redis cache securely: AUTH password and TLS files, kept out of the URL and off argv.

    opts = RedisOptions.load(password_file="/run/secrets/redis", tls_ca_file="/certs/ca.pem")
    redis.Redis.from_url(url, **opts.client_kwargs(url))          # or RedisEmbeddingCache(url, options=opts)

The password comes from, in this order: the URL (`redis://:PASSWORD@host:port/db`, redis-py lets it win),
`password_file` (first line), the environment variable MMPIPE_REDIS_PASSWORD. A password on a command line
is visible to every local user in `ps`; a file or the environment is not. TLS needs a `rediss://` URL; the
CA file verifies the server (hostname checked), the cert/key pair is the client certificate when the server
asks for one (`tls-auth-clients yes`). Stdlib only: the gateway imports it.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from ..errors import InvalidInputError

__all__ = ["RedisOptions", "PASSWORD_ENV"]

PASSWORD_ENV = "MMPIPE_REDIS_PASSWORD"


@dataclass(frozen=True)
class RedisOptions:
    password: str | None = None
    tls_ca_file: str | None = None
    tls_cert_file: str | None = None
    tls_key_file: str | None = None

    def __repr__(self) -> str:  # never print the password
        return (f"RedisOptions(password={'***' if self.password else None}, tls_ca_file={self.tls_ca_file!r}, "
                f"tls_cert_file={self.tls_cert_file!r}, tls_key_file={self.tls_key_file!r})")

    @classmethod
    def load(cls, *, password_file: str | None = None, tls_ca_file: str | None = None,
             tls_cert_file: str | None = None, tls_key_file: str | None = None,
             environ: dict[str, str] | None = None) -> "RedisOptions":
        """Read the password file (or MMPIPE_REDIS_PASSWORD) and check the TLS files exist."""
        env = os.environ if environ is None else environ
        password = None
        if password_file:
            try:
                password = Path(password_file).read_text().splitlines()[0].strip() or None
            except (OSError, IndexError) as e:
                raise InvalidInputError(f"cannot read the Redis password file {password_file}: {e}",
                                        param="redis-password-file") from None
        if password is None:
            password = env.get(PASSWORD_ENV) or None
        if bool(tls_cert_file) != bool(tls_key_file):
            raise InvalidInputError("--redis-tls-cert-file and --redis-tls-key-file go together",
                                    param="redis-tls-cert-file")
        for name, f in (("redis-tls-ca-file", tls_ca_file), ("redis-tls-cert-file", tls_cert_file),
                        ("redis-tls-key-file", tls_key_file)):
            if f and not Path(f).is_file():
                raise InvalidInputError(f"--{name}: no such file {f}", param=name)
        return cls(password, tls_ca_file or None, tls_cert_file or None, tls_key_file or None)

    @property
    def uses_tls_files(self) -> bool:
        return bool(self.tls_ca_file or self.tls_cert_file)

    def client_kwargs(self, url: str) -> dict[str, Any]:
        """Keyword arguments for redis-py's `from_url` (sync or asyncio, client or ConnectionPool)."""
        kw: dict[str, Any] = {}
        if self.password:
            kw["password"] = self.password
        scheme = urlsplit(url).scheme.lower().removesuffix("+cluster")  # rediss+cluster:// is TLS too
        if self.uses_tls_files:
            if scheme != "rediss":
                raise InvalidInputError("Redis TLS files were given but the URL is not rediss://; use "
                                        "rediss://host:port/db to connect over TLS", param="redis-url")
            if self.tls_ca_file:
                kw["ssl_ca_certs"] = self.tls_ca_file
            if self.tls_cert_file:
                kw["ssl_certfile"] = self.tls_cert_file
                kw["ssl_keyfile"] = self.tls_key_file
        if scheme == "rediss":
            # redis-py verifies the certificate by default; say so explicitly, and check the hostname too.
            kw["ssl_cert_reqs"] = "required"
            kw["ssl_check_hostname"] = True
        return kw
