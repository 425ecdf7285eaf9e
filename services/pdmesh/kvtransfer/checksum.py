"""Checksums of KV hand-offs: the sender's of what it exported, the receiver's of what arrived.

A KV tensor is [layers, 2, tokens, kv heads, head_dim] and travels one layer per message; both
ends hash it layer by layer in order, so the receiver hashes each layer while the next ones are
still on the wire and only the last layer's hash lands on the hand-off's critical path (the
sender hashes while its sends are in flight). On CPU the hash is xxh3_64 over the raw bytes
(~13 GB/s on one core here; zlib.crc32 did 3.6 GB/s, too slow to hide; tools/bench_checksum.py).
On a GPU the bytes never come to the host: the checksum is an on-device reduction, a sum and a
position-weighted sum of the 32-bit words (a flipped bit changes the first, two swapped
words the second).
"""

from __future__ import annotations

import torch
import xxhash

XXH3 = "xxh3_64"
DEVICE_SUM = "device_sum"
_MASK64 = (1 << 64) - 1
_FOLD = 0x9E3779B97F4A7C15  # combines per-layer device sums in order
_WEIGHT_PERIOD = 65521  # word i weighs (i % 65521) + 1: swaps at different positions change the sum


def checksum_kind(device: torch.device) -> str:
    return DEVICE_SUM if device.type == "cuda" else XXH3


class KVChecksum:
    """Incremental: update() with consecutive layers of one KV tensor, then digest()."""

    def __init__(self, kind: str = XXH3):
        if kind not in (XXH3, DEVICE_SUM):
            raise ValueError(f"unknown checksum kind {kind!r}")
        self.kind = kind
        self._xxh = xxhash.xxh3_64() if kind == XXH3 else None
        self._value = 0

    def update(self, layer: torch.Tensor) -> None:
        if self._xxh is not None:
            self._xxh.update(_bytes(layer))
        else:
            self._value = (self._value * _FOLD + _device_sum(layer)) & _MASK64

    def digest(self) -> int:
        return self._xxh.intdigest() if self._xxh is not None else self._value


def kv_checksum(kv: torch.Tensor, kind: str | None = None) -> int:
    """The checksum of a whole KV tensor, as a receiver computes it layer by layer."""
    checksum = KVChecksum(kind or checksum_kind(kv.device))
    for layer in kv:
        checksum.update(layer)
    return checksum.digest()


def _bytes(t: torch.Tensor) -> memoryview:
    """The tensor's bytes without a copy (a CPU tensor; contiguous() copies only if it is not)."""
    return memoryview(t.contiguous().view(-1).view(torch.uint8).numpy())


def _device_sum(t: torch.Tensor) -> int:
    raw = t.contiguous().view(-1).view(torch.uint8)
    word = torch.int32 if raw.numel() % 4 == 0 else torch.int16 if raw.numel() % 2 == 0 else torch.uint8
    words = raw.view(word).to(torch.int64)
    weights = torch.arange(words.numel(), device=words.device) % _WEIGHT_PERIOD + 1
    plain, weighted = int(words.sum()), int((words * weights).sum())
    return ((plain & 0xFFFFFFFF) | (weighted << 32)) & _MASK64
