"""`pdmesh certs DIR`: a development CA and one certificate per role, for mutual TLS on internal
ports (`--tls-dir DIR`) and TLS on the client port (`--tls-cert DIR/scheduler.pem --tls-key
DIR/scheduler-key.pem`, clients trust `DIR/ca.pem`).

Short-lived (30 days by default) and for development and tests: production meshes should get
their certificates from their own CA (cert-manager, Vault). Keys are written 0600 and never
belong in git. Every certificate names `pdmesh.internal` (what internal channels check) plus the
given hosts (what clients of the client port dial).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from pdmesh.rpc.cluster_auth import TLS_NAME

ROLES = ("scheduler", "prefill", "decode")


def write_dev_certs(folder: str | Path, days: int = 30, hosts: tuple[str, ...] = ("localhost", "127.0.0.1")) -> Path:
    """Write ca.pem (+ ca-key.pem) and <role>.pem / <role>-key.pem for every role into `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pdmesh development CA")])
    ca = (_builder(ca_name, ca_name, ca_key.public_key(), now, days)
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .sign(ca_key, hashes.SHA256()))
    _write(folder / "ca.pem", ca.public_bytes(serialization.Encoding.PEM))
    _write_key(folder / "ca-key.pem", ca_key)
    names = [x509.DNSName(TLS_NAME)] + [_san(h) for h in hosts]
    for role in ROLES:
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"pdmesh {role}")])
        cert = (_builder(subject, ca_name, key.public_key(), now, days)
                .add_extension(x509.SubjectAlternativeName(names), critical=False)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                      ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
                .sign(ca_key, hashes.SHA256()))
        _write(folder / f"{role}.pem", cert.public_bytes(serialization.Encoding.PEM))
        _write_key(folder / f"{role}-key.pem", key)
    return folder


def _builder(subject: x509.Name, issuer: x509.Name, public_key, now: datetime.datetime,
             days: int) -> x509.CertificateBuilder:
    return (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(public_key)
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=days)))


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _write(path: Path, data: bytes) -> None:
    path.write_bytes(data)


def _write_key(path: Path, key) -> None:
    data = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
