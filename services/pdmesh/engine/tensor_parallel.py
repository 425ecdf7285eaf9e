"""Tensor parallelism for the Llama model: which rank holds what, and moving data inside a group.

Applied after loading, as a transformation of the weights (gpt-fast's approach):
- column-parallel q/k/v and gate/up (each rank holds a slice of the heads / of the FFN),
- row-parallel o and down, followed by an all-reduce of the partial sums,
- the embedding and the LM head replicated: on one host a vocab-parallel head would trade a
  28 MB copy per rank for an all-gather of [tokens, 49,152] logits every step.
KV heads are split across ranks, or replicated when the group is larger than their number.
A group is built from a TCPStore, without a global world. Commands (pickled objects) always go
over Gloo; tensors (all-reduce, KV shards) over NCCL when the ranks run on GPUs (rank i on
cuda:base+i), else over the same Gloo group: one code path for both.
"""

from __future__ import annotations

import datetime
import pickle

import torch
import torch.distributed as dist

from pdmesh.engine.process_group import gloo_group, nccl_group
from pdmesh.engine.model_config import ModelConfig
from pdmesh.errors import InvalidRequestError, UnavailableError


class TPGroupError(UnavailableError):
    """A rank of a tensor-parallel group failed or went silent: the whole group is unusable."""


def check_tp_size(config: ModelConfig, size: int) -> None:
    """Refuse a TP size that cannot split the model's heads evenly."""
    if size < 1:
        raise InvalidRequestError(f"tp must be >= 1, got {size}", "tp")
    if config.num_heads % size:
        raise InvalidRequestError(f"tp {size} does not divide the model's {config.num_heads} attention heads", "tp")
    kv = config.num_kv_heads
    if (size <= kv and kv % size) or (size > kv and size % kv):
        raise InvalidRequestError(f"tp {size} cannot split or evenly replicate the model's {kv} KV heads", "tp")


def kv_heads_of(config: ModelConfig, rank: int, size: int) -> tuple[int, ...]:
    """The model's KV heads that `rank` stores."""
    kv = config.num_kv_heads
    if size <= kv:
        per = kv // size
        return tuple(range(rank * per, (rank + 1) * per))
    return (rank // (size // kv),)


def shard_weights(weights: dict[str, torch.Tensor], config: ModelConfig, rank: int,
                  size: int) -> dict[str, torch.Tensor]:
    """This rank's slice of every weight (HF names kept), per the module docstring."""
    if size == 1:
        return weights
    d = config.head_dim
    q_per = config.num_heads // size
    kv_ids = kv_heads_of(config, rank, size)
    ffn = config.intermediate_size // size
    out = {}
    for name, w in weights.items():
        if ".q_proj." in name:
            out[name] = w[rank * q_per * d:(rank + 1) * q_per * d]
        elif ".k_proj." in name or ".v_proj." in name:
            out[name] = w[kv_ids[0] * d:(kv_ids[-1] + 1) * d]
        elif ".gate_proj." in name or ".up_proj." in name:
            out[name] = w[rank * ffn:(rank + 1) * ffn]
        elif ".o_proj." in name:
            out[name] = w[:, rank * q_per * d:(rank + 1) * q_per * d]
        elif ".down_proj." in name:
            out[name] = w[:, rank * ffn:(rank + 1) * ffn]
        else:
            out[name] = w
    return {name: w.contiguous() for name, w in out.items()}


class TPGroup:
    """One rank's handle on its group: all-reduce for the model, broadcast of commands from
    rank 0, point-to-point sends of KV shards. Every wait has the group's timeout."""

    def __init__(self, store: dist.Store, rank: int, size: int, timeout_s: float, host: str = "127.0.0.1",
                 prefix: str = "tp", device: torch.device = torch.device("cpu")):
        """host: this rank's address, which its transport binds (the group's store host);
        device: this rank's device, where the tensors it all-reduces, sends and receives live."""
        self.rank, self.size, self.timeout = rank, size, datetime.timedelta(seconds=timeout_s)
        self.device = device
        try:
            self.pg = gloo_group(dist.PrefixStore(prefix, store), rank, size, timeout_s, host)
            self.data = self.pg  # tensors
            if device.type == "cuda":
                self.data = nccl_group(dist.PrefixStore(prefix + "/nccl", store), rank, size, timeout_s, device)
        except Exception as exc:
            raise TPGroupError(f"tensor-parallel group of {size}: rank {rank} could not join: {exc}") from exc

    def _wait(self, work, what: str, data: bool = False) -> None:
        """data: `work` is on the tensor group."""
        try:
            if data and self.data is not self.pg:
                # NCCL: order the streams only; a wait with a timeout would block the host on
                # every all-reduce. NCCL's watchdog ends a group that passes the timeout.
                work.wait()
            else:
                work.wait(self.timeout)
        except Exception as exc:
            raise TPGroupError(f"tensor-parallel {what} failed on rank {self.rank}: {exc}") from exc

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        self._wait(self.data.allreduce([tensor]), "all-reduce", data=True)
        return tensor

    def broadcast_object(self, obj=None):
        """Rank 0 sends obj to every rank; every rank returns it."""
        if self.rank == 0:
            payload = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8)
            length = torch.tensor([payload.numel()], dtype=torch.int64)
        else:
            length = torch.zeros(1, dtype=torch.int64)
        self._wait(self.pg.broadcast([length], dist.BroadcastOptions()), "broadcast")
        if self.rank != 0:
            payload = torch.empty(int(length), dtype=torch.uint8)
        self._wait(self.pg.broadcast([payload], dist.BroadcastOptions()), "broadcast")
        return obj if self.rank == 0 else pickle.loads(payload.numpy().tobytes())

    def send(self, tensor: torch.Tensor, dst: int, tag: int = 0) -> None:
        tensor = tensor.to(self.device).contiguous()
        self._wait(self.data.send([tensor], dst, tag), f"send to rank {dst}", data=True)

    def recv(self, shape, dtype: torch.dtype, src: int, tag: int = 0) -> torch.Tensor:
        """A tensor from rank src, on this rank's device."""
        tensor = torch.empty(shape, dtype=dtype, device=self.device)
        self._wait(self.data.recv([tensor], src, tag), f"receive from rank {src}", data=True)
        return tensor
