"""How pdmesh's own processes prove to each other that they belong to the mesh.

Every internal RPC (worker membership, prefill, decode, KV channels) authenticates its caller,
on loopback too: with mutual TLS when `--tls-dir` holds the cluster's certificates (the handshake
checks the caller's certificate against the cluster CA), otherwise with the cluster secret sent as
call metadata (`CLUSTER_SECRET_KEY`) and compared in constant time. `pdmesh serve` makes a fresh
secret for its children when none is given, so even a one-machine mesh is closed to other
processes. Health and reflection stay open on every port.

TLS folder layout (`pdmesh certs DIR` writes it): `ca.pem`, and `<role>.pem` + `<role>-key.pem`
per role (scheduler, prefill, decode). Every certificate names `TLS_NAME`; internal channels check
that name, so a peer's identity is "holds a certificate from the cluster CA", wherever it runs.
"""

from __future__ import annotations

import hmac
import secrets
from dataclasses import dataclass
from pathlib import Path

import grpc

from pdmesh.errors import InvalidRequestError

CLUSTER_SECRET_KEY = "x-pdmesh-cluster-secret"
TLS_NAME = "pdmesh.internal"


def new_secret() -> str:
    return secrets.token_urlsafe(32)


def matches(secret: str, presented: str | None) -> bool:
    """True when a secret is configured and `presented` equals it (constant-time)."""
    return bool(secret) and presented is not None and hmac.compare_digest(secret.encode(), presented.encode())


def metadata(secret: str) -> tuple[tuple[str, str], ...]:
    """Call metadata that carries `secret` (none when there is no secret)."""
    return ((CLUSTER_SECRET_KEY, secret),) if secret else ()


@dataclass(frozen=True)
class ClusterCredentials:
    """One process's credentials for the mesh: what it presents and what it checks."""

    secret: str = ""
    tls_dir: str | None = None
    role: str = "scheduler"  # whose certificate this process presents

    def _read(self, name: str) -> bytes:
        path = Path(self.tls_dir) / name
        try:
            return path.read_bytes()
        except OSError as exc:
            raise InvalidRequestError(f"TLS: cannot read {path}: {exc}", "tls_dir") from exc

    @property
    def mutual_tls(self) -> bool:
        return bool(self.tls_dir)

    def server_credentials(self) -> grpc.ServerCredentials | None:
        """For internal ports: only a caller with a cluster certificate gets through the handshake."""
        if not self.mutual_tls:
            return None
        return grpc.ssl_server_credentials([(self._read(f"{self.role}-key.pem"), self._read(f"{self.role}.pem"))],
                                           root_certificates=self._read("ca.pem"), require_client_auth=True)

    def channel_credentials(self) -> grpc.ChannelCredentials | None:
        if not self.mutual_tls:
            return None
        return grpc.ssl_channel_credentials(self._read("ca.pem"), self._read(f"{self.role}-key.pem"),
                                            self._read(f"{self.role}.pem"))

    def metadata(self) -> tuple[tuple[str, str], ...]:
        return metadata(self.secret)

    def admits(self, call_metadata) -> bool:
        """Whether a call reaching an internal port is the mesh's own. Under mutual TLS the
        handshake already checked the caller's certificate; else the secret must match."""
        if self.mutual_tls:
            return True
        presented = next((v for k, v in call_metadata or () if k == CLUSTER_SECRET_KEY), None)
        return matches(self.secret, presented)
