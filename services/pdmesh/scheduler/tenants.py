"""Tenants: API keys mapped to rate limits, from a TOML file.

    # tenants.toml
    [tenants.acme]
    api_keys = ["acme-key-1", "acme-key-2"]
    requests_per_s = 20        # token bucket on requests
    tokens_per_s = 20000       # token bucket on prompt + max_tokens (unused output is refunded)
    burst_s = 2                # bucket size, in seconds of rate (default 1)
    admin = true               # may call GetClusterStatus (worker addresses, pids)

    [tenants.ops]
    api_keys = ["sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"]

A key may be written as `sha256:<hex of its SHA-256>`, so the file holds no secret; keys are
compared as digests. With no file, every request belongs to one anonymous tenant without limits
(and cluster status is open). With a file, a request must carry `authorization: Bearer <key>` of
a listed key (else UNAUTHENTICATED).
"""

from __future__ import annotations

import hashlib
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from pdmesh.errors import InvalidRequestError, PermissionDeniedError, ResourceExhaustedError, UnauthenticatedError
from pdmesh.rpc import cluster_auth
from pdmesh.scheduler.token_bucket import TokenBucket

ANONYMOUS = "anonymous"
CLUSTER = "_cluster"  # the mesh's own calls (serve's warm-up): no quota, never a client's


class RateLimitedError(ResourceExhaustedError):
    rejection_reason = "rate_limited"


@dataclass(frozen=True, slots=True)
class TenantLimits:
    name: str
    api_keys: tuple[str, ...] = ()
    requests_per_s: float = 0.0  # 0: unlimited
    tokens_per_s: float = 0.0  # 0: unlimited
    burst_s: float = 1.0
    admin: bool = False

    def __post_init__(self):
        if self.requests_per_s < 0 or self.tokens_per_s < 0 or self.burst_s <= 0:
            raise InvalidRequestError(f"tenant {self.name!r}: rates must be >= 0 and burst_s > 0")


@dataclass
class Tenant:
    limits: TenantLimits
    requests: TokenBucket | None = None
    tokens: TokenBucket | None = None
    served_tokens: float = 0.0  # for fair sharing in the queue

    @property
    def name(self) -> str:
        return self.limits.name


def load_tenants_file(path: str | Path) -> list[TenantLimits]:
    try:
        data = tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise InvalidRequestError(f"tenants file {path}: {exc}") from exc
    limits = []
    for name, t in data.get("tenants", {}).items():
        unknown = set(t) - {"api_keys", "requests_per_s", "tokens_per_s", "burst_s", "admin"}
        if unknown:
            raise InvalidRequestError(f"tenants file {path}: tenant {name!r} has unknown keys {sorted(unknown)}")
        limits.append(TenantLimits(name, tuple(t.get("api_keys", ())), float(t.get("requests_per_s", 0)),
                                   float(t.get("tokens_per_s", 0)), float(t.get("burst_s", 1.0)),
                                   bool(t.get("admin", False))))
    return limits


def _sha256(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def key_digest(listed: str) -> str:
    """The SHA-256 hex of an API key as the tenants file lists it (plain, or `sha256:<hex>`)."""
    if listed.startswith("sha256:"):
        digest = listed.removeprefix("sha256:").lower()
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise InvalidRequestError(f"api key {listed[:20]}...: sha256: needs 64 hex digits", "api_keys")
        return digest
    return _sha256(listed)


class TenantDirectory:
    def __init__(self, limits: list[TenantLimits], clock: Callable[[], float] | None = None,
                 cluster_secret: str = ""):
        self.clock = clock
        self.cluster_secret = cluster_secret
        self.cluster = Tenant(TenantLimits(CLUSTER))
        self.tenants: dict[str, Tenant] = {}
        self.by_key: dict[str, Tenant] = {}
        for lim in limits or [TenantLimits(ANONYMOUS)]:
            tenant = Tenant(lim, self._bucket(lim.requests_per_s, lim.burst_s),
                            self._bucket(lim.tokens_per_s, lim.burst_s))
            self.tenants[lim.name] = tenant
            for key in lim.api_keys:
                digest = key_digest(key)
                if digest in self.by_key:
                    raise InvalidRequestError(f"api key listed for both {self.by_key[digest].name!r} and {lim.name!r}")
                self.by_key[digest] = tenant
        self.keyed = bool(limits)

    def _bucket(self, rate: float, burst_s: float) -> TokenBucket | None:
        if not rate:
            return None
        kwargs = {"clock": self.clock} if self.clock else {}
        return TokenBucket(rate, max(1.0, rate * burst_s), **kwargs)

    def authenticate(self, authorization: str | None, cluster_secret: str | None = None) -> Tenant:
        """The caller's tenant: the mesh itself when it presents the cluster secret, else by API key."""
        if cluster_auth.matches(self.cluster_secret, cluster_secret):
            return self.cluster
        if not self.keyed:
            return self.tenants[ANONYMOUS]
        if not authorization:
            raise UnauthenticatedError("missing api key: send metadata 'authorization: Bearer <key>'")
        scheme, _, key = authorization.partition(" ")
        tenant = self.by_key.get(_sha256(key.strip())) if scheme.lower() == "bearer" else None
        if tenant is None:
            raise UnauthenticatedError("unknown api key")
        return tenant

    def authorize_admin(self, authorization: str | None, cluster_secret: str | None = None) -> None:
        """Refuse unless the caller may see the cluster's insides (always, without tenants)."""
        tenant = self.authenticate(authorization, cluster_secret)
        if self.keyed and tenant is not self.cluster and not tenant.limits.admin:
            raise PermissionDeniedError(f"tenant {tenant.name!r} is not an admin (admin = true in the tenants file)")

    def charge(self, tenant: Tenant, tokens: int) -> None:
        """Take one request and `tokens` from the tenant's buckets, or raise RESOURCE_EXHAUSTED."""
        if tenant.requests is not None:
            wait = tenant.requests.try_take(1)
            if wait:
                raise RateLimitedError(
                    f"tenant {tenant.name!r} is over its rate of {tenant.limits.requests_per_s:g} requests/s",
                    retry_after_s=wait)
        if tenant.tokens is not None:
            wait = tenant.tokens.try_take(tokens)
            if wait:
                if tenant.requests is not None:
                    tenant.requests.give_back(1)
                raise RateLimitedError(
                    f"tenant {tenant.name!r} is over its rate of {tenant.limits.tokens_per_s:g} tokens/s",
                    retry_after_s=wait)

    def refund(self, tenant: Tenant, tokens: int) -> None:
        """Give back reserved tokens that were not generated (early stop, error)."""
        if tenant.tokens is not None and tokens > 0:
            tenant.tokens.give_back(tokens)
