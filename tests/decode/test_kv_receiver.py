"""What the decode side trusts, without sockets: a transfer must be as long as asked and hash the same."""

from __future__ import annotations

import grpc
import pytest
import torch

from pdmesh import metrics
from pdmesh.decode.kv_receiver import _failure, _verify
from pdmesh.gen.pdmesh.v1 import prefill_pb2
from pdmesh.kvtransfer.channel import KVIntegrityError, TransferError
from pdmesh.kvtransfer.checksum import XXH3, KVChecksum, kv_checksum


def received(kv: torch.Tensor) -> KVChecksum:
    checksum = KVChecksum(XXH3)
    for layer in kv:
        checksum.update(layer)
    return checksum


def corrupt_count(reason: str) -> float:
    return metrics.KV_HANDOFF_CORRUPT.labels(reason=reason)._value.get()


def test_intact_transfer_passes():
    kv = torch.randn(4, 2, 9, 2, 8)
    done = prefill_pb2.TransferDone(bytes=kv.numel() * 4, checksum=kv_checksum(kv), checksum_kind=XXH3)
    _verify(done, kv.numel() * 4, received(kv), "r", "p:1")


@pytest.mark.parametrize("damage, reason", [("flip", "checksum"), ("short", "short"), ("kind", "checksum")])
def test_damaged_transfer_is_discarded_and_counted(damage, reason):
    sent = torch.randn(4, 2, 9, 2, 8)
    arrived = sent.clone()
    nbytes = sent.numel() * 4
    done = prefill_pb2.TransferDone(bytes=nbytes, checksum=kv_checksum(sent), checksum_kind=XXH3)
    if damage == "flip":
        arrived.view(-1).view(torch.uint8)[77] ^= 0xFF
    elif damage == "short":
        done.bytes = nbytes - 4 * 4 * 2 * 9 * 2  # one element short per head
    else:
        done.checksum_kind = "device_sum"
    before = corrupt_count(reason)
    with pytest.raises(KVIntegrityError, match="KV of r from p:1 is") as err:
        _verify(done, nbytes, received(arrived), "r", "p:1")
    assert err.value.reason == reason and corrupt_count(reason) == before + 1


class _RpcError(grpc.aio.AioRpcError):
    def __init__(self, code):
        super().__init__(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details="boom")


@pytest.mark.parametrize("exc, reason", [
    (_RpcError(grpc.StatusCode.DEADLINE_EXCEEDED), "timeout"),
    (_RpcError(grpc.StatusCode.UNAVAILABLE), "lost"),
    (TransferError("receive tag 3 failed: Timed out", timed_out=True), "timeout"),
    (TransferError("receive tag 3 failed: Connection closed by peer"), "lost"),
    (_RpcError(grpc.StatusCode.NOT_FOUND), None),  # nothing was sent: a plain failed hand-off
])
def test_failed_pull_is_classified(exc, reason):
    error = _failure(exc, "r", "p:1")
    assert isinstance(error, TransferError)
    assert getattr(error, "reason", None) == reason
