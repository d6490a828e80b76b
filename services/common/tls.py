"""TLS and mutual TLS for every gRPC hop: the stage servers, the gateway's public gRPC port, the stage clients.

Server side (every stage and the gateway's public gRPC API):
    --tls-cert-file / --tls-key-file   serve TLS with this PEM certificate chain and key   [MMPIPE_TLS_CERT_FILE / _KEY_FILE]
    --tls-ca-file                      and require client certificates signed by this CA (mTLS) [MMPIPE_TLS_CA_FILE]
Client side (ingest -> encoder, gateway -> ingest/encoder/generator, health checks):
    --stage-tls-ca-file                verify the stages' certificates with this CA       [MMPIPE_STAGE_TLS_CA_FILE]
    --stage-tls-cert-file / -key-file  present this client certificate (for mTLS)         [MMPIPE_STAGE_TLS_CERT_FILE / _KEY_FILE]
    --stage-tls-server-name            name to check the server certificate against, instead of the host
                                       of the address (e.g. when dialling an IP)           [MMPIPE_STAGE_TLS_SERVER_NAME]
Any --stage-tls-* flag turns TLS on for the stage channels (without a CA file, the system roots verify).
Nothing set: plaintext, as before; use it only on a network nobody else can reach.

Stdlib only at import time (the gateway's `--help` must stay fast); grpc is imported when credentials are built.
"""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from mmpipe.shared.errors import InvalidInputError

__all__ = ["ServerTLS", "ClientTLS", "add_server_tls_args", "add_client_tls_args", "server_tls_from_args",
           "client_tls_from_args", "client_tls_from_env"]


def _read(path: str, flag: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise InvalidInputError(f"--{flag}: cannot read {path}: {e.strerror or e}", param=flag) from None


def _check_files(pairs: list[tuple[str, str | None]]) -> None:
    for flag, path in pairs:
        if path and not Path(path).is_file():
            raise InvalidInputError(f"--{flag}: no such file {path}", param=flag)


@dataclass(frozen=True)
class ServerTLS:
    """A TLS server identity; with `ca_file`, clients must present a certificate signed by it (mTLS)."""

    cert_file: str
    key_file: str
    ca_file: str | None = None

    @property
    def mutual(self) -> bool:
        return self.ca_file is not None

    def credentials(self) -> Any:
        import grpc

        ca = _read(self.ca_file, "tls-ca-file") if self.ca_file else None
        return grpc.ssl_server_credentials([(_read(self.key_file, "tls-key-file"),
                                             _read(self.cert_file, "tls-cert-file"))],
                                           root_certificates=ca, require_client_auth=ca is not None)

    def args(self) -> list[str]:
        """The flags that recreate this config in a child process (`mmpipe serve`)."""
        a = ["--tls-cert-file", self.cert_file, "--tls-key-file", self.key_file]
        return a + (["--tls-ca-file", self.ca_file] if self.ca_file else [])


@dataclass(frozen=True)
class ClientTLS:
    """How a stage client verifies the server (CA) and proves who it is (client certificate, for mTLS)."""

    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    server_name: str | None = None

    def credentials(self) -> Any:
        import grpc

        return grpc.ssl_channel_credentials(
            root_certificates=_read(self.ca_file, "stage-tls-ca-file") if self.ca_file else None,
            private_key=_read(self.key_file, "stage-tls-key-file") if self.key_file else None,
            certificate_chain=_read(self.cert_file, "stage-tls-cert-file") if self.cert_file else None)

    def channel_options(self) -> list[tuple[str, Any]]:
        return [("grpc.ssl_target_name_override", self.server_name)] if self.server_name else []

    def args(self) -> list[str]:
        a: list[str] = []
        for flag, v in (("--stage-tls-ca-file", self.ca_file), ("--stage-tls-cert-file", self.cert_file),
                        ("--stage-tls-key-file", self.key_file), ("--stage-tls-server-name", self.server_name)):
            if v:
                a += [flag, v]
        return a


def _env(name: str, environ: Mapping[str, str] | None = None) -> str | None:
    return (os.environ if environ is None else environ).get(f"MMPIPE_{name}") or None


def add_server_tls_args(p: argparse.ArgumentParser | Any) -> None:
    p.add_argument("--tls-cert-file", default=_env("TLS_CERT_FILE"),
                   help="serve gRPC over TLS with this PEM certificate (chain) [MMPIPE_TLS_CERT_FILE]")
    p.add_argument("--tls-key-file", default=_env("TLS_KEY_FILE"),
                   help="the PEM private key of --tls-cert-file [MMPIPE_TLS_KEY_FILE]")
    p.add_argument("--tls-ca-file", default=_env("TLS_CA_FILE"),
                   help="require gRPC clients to present a certificate signed by this CA (mTLS) [MMPIPE_TLS_CA_FILE]")


def add_client_tls_args(p: argparse.ArgumentParser | Any) -> None:
    p.add_argument("--stage-tls-ca-file", default=_env("STAGE_TLS_CA_FILE"),
                   help="connect to the stages over TLS, verifying them with this CA [MMPIPE_STAGE_TLS_CA_FILE]")
    p.add_argument("--stage-tls-cert-file", default=_env("STAGE_TLS_CERT_FILE"),
                   help="client certificate presented to the stages (mTLS) [MMPIPE_STAGE_TLS_CERT_FILE]")
    p.add_argument("--stage-tls-key-file", default=_env("STAGE_TLS_KEY_FILE"),
                   help="the PEM private key of --stage-tls-cert-file [MMPIPE_STAGE_TLS_KEY_FILE]")
    p.add_argument("--stage-tls-server-name", default=_env("STAGE_TLS_SERVER_NAME"),
                   help="check the stages' certificates against this name instead of the address's host "
                        "[MMPIPE_STAGE_TLS_SERVER_NAME]")


def _server_tls(cert: str | None, key: str | None, ca: str | None) -> ServerTLS | None:
    if not (cert or key or ca):
        return None
    if not (cert and key):
        raise InvalidInputError("gRPC TLS needs both --tls-cert-file and --tls-key-file (and --tls-ca-file only "
                                "with them)", param="tls-cert-file")
    _check_files([("tls-cert-file", cert), ("tls-key-file", key), ("tls-ca-file", ca)])
    return ServerTLS(cert, key, ca)


def _client_tls(ca: str | None, cert: str | None, key: str | None, name: str | None) -> ClientTLS | None:
    if not (ca or cert or key):
        return None  # a server name alone does not turn TLS on
    if bool(cert) != bool(key):
        raise InvalidInputError("--stage-tls-cert-file and --stage-tls-key-file go together",
                                param="stage-tls-cert-file")
    _check_files([("stage-tls-ca-file", ca), ("stage-tls-cert-file", cert), ("stage-tls-key-file", key)])
    return ClientTLS(ca, cert, key, name)


def server_tls_from_args(a: argparse.Namespace) -> ServerTLS | None:
    return _server_tls(getattr(a, "tls_cert_file", None), getattr(a, "tls_key_file", None),
                       getattr(a, "tls_ca_file", None))


def client_tls_from_args(a: argparse.Namespace) -> ClientTLS | None:
    return _client_tls(getattr(a, "stage_tls_ca_file", None), getattr(a, "stage_tls_cert_file", None),
                       getattr(a, "stage_tls_key_file", None), getattr(a, "stage_tls_server_name", None))


def client_tls_from_env(environ: Mapping[str, str] | None = None) -> ClientTLS | None:
    return _client_tls(_env("STAGE_TLS_CA_FILE", environ), _env("STAGE_TLS_CERT_FILE", environ),
                       _env("STAGE_TLS_KEY_FILE", environ), _env("STAGE_TLS_SERVER_NAME", environ))
