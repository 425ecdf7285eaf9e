"""Protobuf <-> dataclass conversion for the internal worker messages (from_pb / to_pb)."""

from __future__ import annotations

from pdmesh.engine.kv_cache import KVLayout
from pdmesh.engine.sampling_params import SamplingParams
from pdmesh.gen.pdmesh.v1 import worker_pb2


def sampling_from_pb(pb: worker_pb2.SamplingParams) -> SamplingParams:
    return SamplingParams(max_tokens=pb.max_tokens, temperature=pb.temperature, top_p=pb.top_p or 1.0,
                          top_k=pb.top_k, seed=pb.seed if pb.HasField("seed") else None,
                          stop_token_ids=tuple(pb.stop_token_ids), ignore_eos=pb.ignore_eos)


def sampling_to_pb(p: SamplingParams) -> worker_pb2.SamplingParams:
    return worker_pb2.SamplingParams(max_tokens=p.max_tokens, temperature=p.temperature, top_p=p.top_p,
                                     top_k=p.top_k, seed=p.seed, stop_token_ids=list(p.stop_token_ids),
                                     ignore_eos=p.ignore_eos)


def layout_from_pb(pb: worker_pb2.KVLayout) -> KVLayout:
    ranks = tuple(tuple(r.kv_head_ids) for r in sorted(pb.ranks, key=lambda r: r.rank))
    return KVLayout(pb.num_layers, pb.num_kv_heads, pb.head_dim, pb.dtype, tuple(pb.kv_head_ids), ranks,
                    device=pb.device or "cpu", device_id=pb.device_id)


def layout_to_pb(layout: KVLayout) -> worker_pb2.KVLayout:
    return worker_pb2.KVLayout(num_layers=layout.num_layers, num_kv_heads=layout.num_kv_heads,
                               head_dim=layout.head_dim, dtype=layout.dtype,
                               kv_head_ids=list(layout.kv_head_ids), device=layout.device,
                               device_id=layout.device_id,
                               ranks=[worker_pb2.TPRank(rank=r, kv_head_ids=list(h))
                                      for r, h in enumerate(layout.rank_kv_heads)])
