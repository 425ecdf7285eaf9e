"""A follower rank of a worker's tensor-parallel group (started by rank 0 through pdmesh.child)."""

from __future__ import annotations

import logging

import torch

from pdmesh.child import TPFollowerSpec
from pdmesh.engine.checkpoint import load_checkpoint
from pdmesh.engine.kv_cache import KVLayout
from pdmesh.engine.model import LlamaModel
from pdmesh.engine.process_group import connect_store
from pdmesh.engine.tensor_parallel import TPGroup, TPGroupError, kv_heads_of, shard_weights
from pdmesh.engine.tp_engine import follow
from pdmesh.worker.runtime import apply_cpu_placement, group_threads
from pdmesh.worker.tensor_parallel_group import JOIN_TIMEOUT_S, OP_TIMEOUT_S

log = logging.getLogger("pdmesh.tp_follower")


def follow_group(spec: TPFollowerSpec) -> int:
    """Load this rank's shard, join the group and run rank 0's commands until told to stop."""
    config, rank = spec.worker, spec.rank
    apply_cpu_placement(group_threads(config))
    checkpoint = load_checkpoint(config.model, log=lambda _: None)
    model_config = checkpoint.config
    dtype = getattr(torch, config.engine.dtype)
    weights = shard_weights({n: w.to(dtype) for n, w in checkpoint.weights.items()}, model_config, rank, config.tp)
    max_len = min(config.engine.max_model_len or model_config.max_position_embeddings,
                  model_config.max_position_embeddings)
    try:
        store = connect_store(spec.store_host, spec.store_port, config.tp, JOIN_TIMEOUT_S)
        group = TPGroup(store, rank, config.tp, JOIN_TIMEOUT_S, spec.store_host)
        group.timeout = type(group.timeout)(seconds=OP_TIMEOUT_S)
        model = LlamaModel(model_config, weights, max_len, all_reduce=group.all_reduce)
        layout = KVLayout(model_config.num_layers, model_config.num_kv_heads, model_config.head_dim,
                          config.engine.dtype, kv_heads_of(model_config, rank, config.tp))
        with torch.inference_mode():
            follow(group, model, layout)
    except TPGroupError as exc:
        log.error("rank %d leaving: %s", rank, exc)
        return 3
    return 0
