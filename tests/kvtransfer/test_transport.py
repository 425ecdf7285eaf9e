"""How KV moves between two workers, as each end derives it from the two layouts."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from pdmesh.engine.engine_protocol import KVFingerprint
from pdmesh.engine.kv_cache import KVLayout
from pdmesh.kvtransfer.channel import RECEIVER_RANK, KVChannel, serve_store
from pdmesh.kvtransfer.layout_check import LayoutMismatchError, check_layouts, check_transport, transport_for
from pdmesh.worker.convert import layout_from_pb, layout_to_pb

GPU_A, GPU_B = "GPU-5d6e1f2a", "GPU-9b8c7d6e"


def layout(device: str = "cpu", device_id: str = "") -> KVLayout:
    return KVLayout(30, 3, 64, "bfloat16", (0, 1, 2), device=device, device_id=device_id)


@pytest.mark.parametrize("sender,receiver,backend", [
    (layout(), layout(), "gloo"),
    (layout("cuda", GPU_A), layout("cuda", GPU_B), "nccl"),  # two GPUs: device to device
    (layout("cuda", GPU_A), layout("cuda", GPU_A), "gloo"),  # one GPU: NCCL refuses two ranks there
    (layout("cuda", GPU_A), layout(), "gloo"),  # a GPU and a CPU: through the host
    (layout(), layout("cuda", GPU_B), "gloo"),
    (layout("cuda", ""), layout("cuda", GPU_B), "gloo"),  # an end that cannot name its GPU: the safe way
])
def test_transport_follows_the_two_devices(sender, receiver, backend):
    assert transport_for(sender, receiver) == backend
    assert transport_for(receiver, sender) == backend  # both ends agree, whichever computes it


def test_device_kinds_may_differ_but_must_be_known():
    check_layouts(sender=layout("cuda", GPU_A), receiver=layout())
    with pytest.raises(LayoutMismatchError, match="device is 'xpu' on the sender"):
        check_layouts(sender=layout("xpu"), receiver=layout())


def test_fingerprints_pair_a_gpu_worker_with_a_cpu_worker():
    gpu = KVFingerprint("pdmesh", "SmolLM2", layout("cuda", GPU_A))
    assert gpu.mismatch(KVFingerprint("pdmesh", "SmolLM2", layout())) is None


def test_ends_that_disagree_on_the_backend_fail_at_once():
    check_transport(sender="nccl", receiver="nccl")
    check_transport(sender="", receiver="gloo")  # an older sender that does not say: Gloo, as always
    with pytest.raises(LayoutMismatchError, match="the sender joins over gloo, the receiver over nccl"):
        check_transport(sender="gloo", receiver="nccl")


def test_layout_device_travels_in_the_proto():
    gpu = dataclasses.replace(layout("cuda", GPU_A), rank_kv_heads=((0, 1, 2),))
    assert layout_from_pb(layout_to_pb(gpu)) == gpu
    old = layout_to_pb(layout())
    old.device = ""  # from a worker that predates device kinds
    assert layout_from_pb(old).device == "cpu"


def test_nccl_needs_a_gpu_end():
    with pytest.raises(ValueError, match="backend 'nccl' cannot serve a KV cache on cpu"):
        KVChannel(serve_store("127.0.0.1", 1.0), "x", RECEIVER_RANK, 1.0, "127.0.0.1", torch.device("cpu"), "nccl")
