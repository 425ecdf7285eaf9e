"""A follower rank of a worker's tensor-parallel group (started by rank 0; not run by hand)."""

from __future__ import annotations

import argparse
import logging
import sys

import torch

from pdmesh.config import CpuPlacement
from pdmesh.engine.checkpoint import load_checkpoint
from pdmesh.engine.kv_cache import KVLayout
from pdmesh.engine.model import LlamaModel
from pdmesh.engine.tensor_parallel import TPGroup, TPGroupError, kv_heads_of, shard_weights
from pdmesh.engine.tp_engine import follow
from pdmesh.kvtransfer.channel import connect_store
from pdmesh.worker.runtime import apply_cpu_placement
from pdmesh.worker.tensor_parallel_group import JOIN_TIMEOUT_S, OP_TIMEOUT_S

log = logging.getLogger("pdmesh.tp_follower")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="pdmesh.worker.tp_follower")
    p.add_argument("--store", required=True)
    p.add_argument("--rank", type=int, required=True)
    p.add_argument("--tp", type=int, required=True)
    p.add_argument("--model", default=None)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--nice", type=int, default=0)
    p.add_argument("--max-model-len", type=int, default=0)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s rank {args.rank} %(levelname)s %(message)s")
    apply_cpu_placement(CpuPlacement(args.threads, args.nice))
    checkpoint = load_checkpoint(args.model, log=lambda _: None)
    config = checkpoint.config
    dtype = getattr(torch, args.dtype)
    weights = shard_weights({n: w.to(dtype) for n, w in checkpoint.weights.items()}, config, args.rank, args.tp)
    max_len = min(args.max_model_len or config.max_position_embeddings, config.max_position_embeddings)
    host, port = args.store.rsplit(":", 1)
    try:
        group = TPGroup(connect_store(host, int(port), JOIN_TIMEOUT_S), args.rank, args.tp, JOIN_TIMEOUT_S)
        group.timeout = type(group.timeout)(seconds=OP_TIMEOUT_S)
        model = LlamaModel(config, weights, max_len, all_reduce=group.all_reduce)
        layout = KVLayout(config.num_layers, config.num_kv_heads, config.head_dim, args.dtype,
                          kv_heads_of(config, args.rank, args.tp))
        with torch.inference_mode():
            follow(group, model, layout)
    except TPGroupError as exc:
        log.error("leaving: %s", exc)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
