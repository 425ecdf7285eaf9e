"""Pairwise Gloo channels between real processes: data arrives intact, failures end in bounded time."""

from __future__ import annotations

import multiprocessing as mp
import os
import time

import pytest
import torch

from pdmesh.engine.kv_cache import KVLayout
from pdmesh.kvtransfer.channel import (RECEIVER_RANK, SENDER_RANK, KVChannel, TransferError, connect_store,
                                       serve_store)
from pdmesh.kvtransfer.layout_check import LayoutMismatchError, check_layouts
from support.mesh import free_port

SHAPE = (4, 2, 33, 3, 8)  # layers, k/v, tokens, kv heads, head dim


def _sender(port: int, channel_id: str, count: int, die_after: int | None) -> None:
    channel = KVChannel(connect_store("127.0.0.1", port, 10), channel_id, SENDER_RANK, 10, "127.0.0.1")
    for tag in range(count):
        if tag == die_after:
            os._exit(1)  # vanish mid-conversation, as a killed worker would
        channel.send(torch.full(SHAPE, float(tag)), tag)


def _spawn(*args) -> mp.Process:
    process = mp.get_context("spawn").Process(target=_sender, args=args, daemon=True)
    process.start()
    return process


def test_transfers_arrive_intact_in_order():
    store = serve_store("127.0.0.1", 10)
    sender = _spawn(store.port, "ok", 5, None)
    channel = KVChannel(store, "ok", RECEIVER_RANK, 10, "127.0.0.1")
    for tag in range(5):
        kv = channel.recv(SHAPE, torch.float32, tag)
        assert torch.equal(kv, torch.full(SHAPE, float(tag)))
    sender.join(10)
    assert sender.exitcode == 0


def test_peer_that_dies_mid_transfer_is_an_error_not_a_hang():
    store = serve_store("127.0.0.1", 5)
    sender = _spawn(store.port, "dies", 3, 1)
    channel = KVChannel(store, "dies", RECEIVER_RANK, 5, "127.0.0.1")
    channel.recv(SHAPE, torch.float32, 0)
    start = time.monotonic()
    with pytest.raises(TransferError, match="receive tag 1 failed"):
        channel.recv(SHAPE, torch.float32, 1)
    assert time.monotonic() - start < 6
    assert channel.broken
    with pytest.raises(TransferError, match="broken"):
        channel.recv(SHAPE, torch.float32, 2)
    sender.join(5)


def test_peer_that_never_joins_times_out():
    store = serve_store("127.0.0.1", 1.0)
    start = time.monotonic()
    with pytest.raises(TransferError, match="did not join"):
        KVChannel(store, "lonely", RECEIVER_RANK, 1.0, "127.0.0.1")
    assert time.monotonic() - start < 5


def test_unreachable_store_is_a_clear_error():
    port = free_port()  # nothing listens there
    start = time.monotonic()
    with pytest.raises(TransferError, match=f"cannot reach the KV channel store at 127.0.0.1:{port}"):
        connect_store("127.0.0.1", port, 1.0)
    assert time.monotonic() - start < 5


def layout(**overrides) -> KVLayout:
    fields = dict(num_layers=30, num_kv_heads=3, head_dim=64, dtype="float32", kv_head_ids=(0, 1, 2))
    fields.update(overrides)
    return KVLayout(**fields)


@pytest.mark.parametrize("field,value", [("num_layers", 24), ("head_dim", 128), ("dtype", "bfloat16"),
                                         ("num_kv_heads", 4)])
def test_layout_mismatch_names_the_field(field, value):
    with pytest.raises(LayoutMismatchError, match=f"{field} is {value} on the sender"):
        check_layouts(sender=layout(**{field: value}), receiver=layout())


def test_receiver_needs_every_head_it_owns():
    check_layouts(sender=layout(), receiver=layout(kv_head_ids=(1,)))
    with pytest.raises(LayoutMismatchError, match=r"lacks KV heads \[2\]"):
        check_layouts(sender=layout(kv_head_ids=(0, 1)), receiver=layout(kv_head_ids=(1, 2)))


def _short_sender(port: int) -> None:
    channel = KVChannel(connect_store("127.0.0.1", port, 10), "short", SENDER_RANK, 10, "127.0.0.1")
    channel.send(torch.full(SHAPE, 1.0)[..., :-1].contiguous(), 0)  # every layer one element short a head


def test_short_message_is_accepted_by_gloo_so_the_checksum_must_catch_it():
    from pdmesh.kvtransfer.checksum import KVChecksum, kv_checksum

    store = serve_store("127.0.0.1", 10)
    sender = mp.get_context("spawn").Process(target=_short_sender, args=(store.port,), daemon=True)
    sender.start()
    channel = KVChannel(store, "short", RECEIVER_RANK, 10, "127.0.0.1")
    checksum, layers = KVChecksum(), []
    kv = channel.recv(SHAPE, torch.float32, 0, lambda layer: (checksum.update(layer), layers.append(layer)))
    assert len(layers) == SHAPE[0]  # one callback per layer, in order, as each landed
    assert checksum.digest() == kv_checksum(kv)
    assert checksum.digest() != kv_checksum(torch.full(SHAPE, 1.0))  # no error, yet not what was meant
    sender.join(10)
