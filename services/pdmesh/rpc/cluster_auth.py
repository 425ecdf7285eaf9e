"""The cluster secret: how pdmesh's own processes prove to each other that they belong to the mesh.

A caller inside the mesh sends the secret as call metadata (`CLUSTER_SECRET_KEY`); a service
compares it in constant time. `pdmesh serve` makes a fresh secret for its children when none is
given, so even a mesh on one machine is closed to other processes.
"""

from __future__ import annotations

import hmac
import secrets

CLUSTER_SECRET_KEY = "x-pdmesh-cluster-secret"


def new_secret() -> str:
    return secrets.token_urlsafe(32)


def matches(secret: str, presented: str | None) -> bool:
    """True when a secret is configured and `presented` equals it (constant-time)."""
    return bool(secret) and presented is not None and hmac.compare_digest(secret.encode(), presented.encode())


def metadata(secret: str) -> tuple[tuple[str, str], ...]:
    """Call metadata that carries `secret` (none when there is no secret)."""
    return ((CLUSTER_SECRET_KEY, secret),) if secret else ()
