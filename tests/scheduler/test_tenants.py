"""Tenants from a TOML file, api keys, token buckets with refunds."""

from __future__ import annotations

import pytest

from pdmesh.errors import InvalidRequestError, ResourceExhaustedError, UnauthenticatedError
from pdmesh.scheduler.tenants import TenantDirectory, load_tenants_file
from pdmesh.scheduler.token_bucket import TokenBucket


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_token_bucket_allows_one_oversized_take_then_waits_for_the_debt():
    clock = Clock()
    bucket = TokenBucket(rate=10, burst=10, clock=clock)
    assert bucket.try_take(25) == 0.0  # larger than the burst: allowed from a full bucket, into debt
    assert bucket.try_take(1) == pytest.approx(1.6, abs=0.01)  # repay 15, then 1 more
    clock.now += 1.6
    assert bucket.try_take(1) == 0.0
    assert bucket.try_take(1) > 0  # needs a whole unit, not just a positive level
    bucket.give_back(100)
    assert bucket.level == 10  # never above the burst


def write(tmp_path, text: str):
    path = tmp_path / "tenants.toml"
    path.write_text(text)
    return path


def test_keys_map_to_tenants_and_unknown_keys_are_refused(tmp_path):
    limits = load_tenants_file(write(tmp_path, """
[tenants.acme]
api_keys = ["k1", "k2"]
requests_per_s = 2
[tenants.beta]
api_keys = ["k3"]
"""))
    directory = TenantDirectory(limits)
    assert directory.authenticate("Bearer k2").name == "acme"
    assert directory.authenticate("bearer k3").name == "beta"
    for bad in (None, "", "Bearer nope", "Basic k1"):
        with pytest.raises(UnauthenticatedError):
            directory.authenticate(bad)


def test_no_file_means_one_anonymous_tenant_without_limits():
    directory = TenantDirectory([])
    tenant = directory.authenticate(None)
    assert tenant.name == "anonymous"
    for _ in range(1000):
        directory.charge(tenant, 10**6)


def test_request_and_token_rates(tmp_path):
    clock = Clock()
    limits = load_tenants_file(write(tmp_path, """
[tenants.acme]
api_keys = ["k"]
requests_per_s = 2
tokens_per_s = 100
burst_s = 1
"""))
    directory = TenantDirectory(limits, clock=clock)
    acme = directory.authenticate("Bearer k")
    directory.charge(acme, 50)
    directory.charge(acme, 50)
    with pytest.raises(ResourceExhaustedError, match="over its rate of 2 requests/s") as err:
        directory.charge(acme, 1)
    assert 0 < err.value.retry_after_s <= 0.6
    clock.now += 1.0
    directory.charge(acme, 150)  # tokens go into debt
    with pytest.raises(ResourceExhaustedError, match="over its rate of 100 tokens/s"):
        directory.charge(acme, 1)
    directory.refund(acme, 150)  # nothing was generated after all
    directory.charge(acme, 1)


def test_bad_files_are_clear(tmp_path):
    with pytest.raises(InvalidRequestError, match="unknown keys"):
        load_tenants_file(write(tmp_path, "[tenants.a]\nrate = 3\n"))
    with pytest.raises(InvalidRequestError, match="tenants.toml"):
        load_tenants_file(write(tmp_path, "[tenants.a\n"))
    with pytest.raises(InvalidRequestError, match="both"):
        TenantDirectory(load_tenants_file(write(tmp_path, "[tenants.a]\napi_keys=['x']\n[tenants.b]\napi_keys=['x']\n")))
