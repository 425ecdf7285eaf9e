"""KV checksums: layer-by-layer equals whole, any flipped byte or swapped word changes them."""

from __future__ import annotations

import pytest
import torch

from pdmesh.kvtransfer.checksum import DEVICE_SUM, XXH3, KVChecksum, checksum_kind, kv_checksum


def kv(tokens: int = 33, dtype=torch.float32) -> torch.Tensor:
    torch.manual_seed(0)
    return torch.randn(4, 2, tokens, 3, 8).to(dtype)  # layers, k/v, tokens, kv heads, head dim


@pytest.mark.parametrize("kind", [XXH3, DEVICE_SUM])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layer_by_layer_matches_and_changes_are_caught(kind, dtype):
    t = kv(dtype=dtype)
    incremental = KVChecksum(kind)
    for layer in t.clone():
        incremental.update(layer)
    assert incremental.digest() == kv_checksum(t, kind)
    flipped = t.clone()
    flipped.view(-1).view(torch.uint8)[1234] ^= 0x01
    assert kv_checksum(flipped, kind) != kv_checksum(t, kind)
    swapped = t.clone()
    flat = swapped.view(-1)
    flat[[3, 700]] = flat[[700, 3]]
    assert kv_checksum(swapped, kind) != kv_checksum(t, kind)
    assert kv_checksum(t[..., :-1].contiguous(), kind) != kv_checksum(t, kind)


def test_kind_follows_the_device():
    assert checksum_kind(torch.device("cpu")) == XXH3
    assert checksum_kind(torch.device("cuda", 0)) == DEVICE_SUM
