"""A follower rank of a worker's tensor-parallel group (started by rank 0 through pdmesh.child)."""

from __future__ import annotations

import logging

import torch

from pdmesh.child import TPFollowerSpec
from pdmesh.engine.checkpoint import load_checkpoint
from pdmesh.engine.device import device_uuid, rank_device, resolve_device, resolve_dtype, use_device
from pdmesh.engine.kv_cache import KVLayout
from pdmesh.engine.process_group import connect_store
from pdmesh.engine.tensor_parallel import TPGroup, TPGroupError, kv_heads_of
from pdmesh.engine.tp_engine import follow
from pdmesh.worker.runtime import apply_cpu_placement, group_threads
from pdmesh.worker.tensor_parallel_group import JOIN_TIMEOUT_S, OP_TIMEOUT_S, rank_model, rank_weights

log = logging.getLogger("pdmesh.tp_follower")


def follow_group(spec: TPFollowerSpec) -> int:
    """Load this rank's shard, join the group and run rank 0's commands until told to stop."""
    config, rank = spec.worker, spec.rank
    apply_cpu_placement(group_threads(config))
    checkpoint = load_checkpoint(config.model, log=lambda _: None)
    model_config = checkpoint.config
    device = rank_device(resolve_device(config.engine.device, num_ranks=config.tp), rank)
    use_device(device)
    weights = rank_weights(config, checkpoint, rank, device)  # before joining: rank 0 waits at most OP_TIMEOUT_S
    try:
        store = connect_store(spec.store_host, spec.store_port, config.tp, JOIN_TIMEOUT_S)
        group = TPGroup(store, rank, config.tp, JOIN_TIMEOUT_S, spec.store_host, device=device)
        group.timeout = type(group.timeout)(seconds=OP_TIMEOUT_S)
        model = rank_model(config, checkpoint, weights, device, group)
        layout = KVLayout(model_config.num_layers, model_config.num_kv_heads, model_config.head_dim,
                          resolve_dtype(config.engine.dtype, device), kv_heads_of(model_config, rank, config.tp),
                          device=device.type, device_id=device_uuid(device))
        with torch.inference_mode():
            follow(group, model, layout)
    except TPGroupError as exc:
        log.error("rank %d leaving: %s", rank, exc)
        return 3
    return 0
