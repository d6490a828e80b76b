"""Throw-away PKI for the TLS / mTLS tests, made with `cryptography`: a CA, a server certificate for
127.0.0.1 / localhost, and a client certificate, written as PEM files into a folder.

    certs = make_certs(tmp_path)      # certs.ca, certs.server_cert, certs.server_key, certs.client_cert, ...
"""
from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

import pytest


@dataclass(frozen=True)
class Certs:
    ca: str
    server_cert: str
    server_key: str
    client_cert: str
    client_key: str
    other_ca: str  # a CA that signed nothing here: verifying with it must fail


def _key():
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP256R1())


def _name(cn: str):
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write(path: Path, cert=None, key=None) -> str:
    from cryptography.hazmat.primitives import serialization

    if cert is not None:
        path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    else:
        path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
        path.chmod(0o600)
    return str(path)


def _ca(cn: str):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes

    key = _key()
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(_name(cn)).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .sign(key, hashes.SHA256()))
    return cert, key


def _leaf(ca_cert, ca_key, cn: str, *, server: bool):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import ExtendedKeyUsageOID

    key = _key()
    now = dt.datetime.now(dt.timezone.utc)
    b = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(ca_cert.subject).public_key(key.public_key())
         .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
         .not_valid_after(now + dt.timedelta(days=1))
         .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True))
    if server:
        b = b.add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                         x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                            critical=False)
        # clientAuth too: a stage's own certificate is what docker/healthcheck.py presents under mTLS
        eku = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    else:
        eku = [ExtendedKeyUsageOID.CLIENT_AUTH]
    b = b.add_extension(x509.ExtendedKeyUsage(eku), critical=False)
    return b.sign(ca_key, hashes.SHA256()), key


def make_certs(folder: Path) -> Certs:
    folder.mkdir(parents=True, exist_ok=True)
    ca_cert, ca_key = _ca("mmpipe test CA")
    other_cert, _ = _ca("some other CA")
    s_cert, s_key = _leaf(ca_cert, ca_key, "mmpipe-stage", server=True)
    c_cert, c_key = _leaf(ca_cert, ca_key, "mmpipe-client", server=False)
    return Certs(ca=_write(folder / "ca.pem", ca_cert), server_cert=_write(folder / "server.pem", s_cert),
                 server_key=_write(folder / "server.key", key=s_key), client_cert=_write(folder / "client.pem", c_cert),
                 client_key=_write(folder / "client.key", key=c_key), other_ca=_write(folder / "other-ca.pem", other_cert))


@pytest.fixture(scope="session")
def certs(tmp_path_factory) -> Certs:
    pytest.importorskip("cryptography", reason="the TLS tests make their certificates with `cryptography` "
                                               "(in the [test] extra)")
    return make_certs(tmp_path_factory.mktemp("pki"))
