"""Engine settings: one frozen dataclass, validated on construction."""

from __future__ import annotations

from dataclasses import dataclass

from pdmesh.errors import InvalidRequestError

DTYPES = ("float32", "bfloat16")


@dataclass(frozen=True, slots=True)
class EngineConfig:
    max_model_len: int = 0  # 0: the model's context length
    block_size: int = 16
    kv_cache_gib: float = 1.0  # memory for KV blocks
    max_num_seqs: int = 64  # sequences in the running batch
    max_num_batched_tokens: int = 4096  # prompt tokens prefilled in one step
    dtype: str = "float32"

    def __post_init__(self):
        if self.max_model_len < 0:
            raise InvalidRequestError(f"max_model_len must be >= 0, got {self.max_model_len}", "max_model_len")
        if self.block_size < 1 or self.max_num_seqs < 1 or self.max_num_batched_tokens < 1:
            raise InvalidRequestError("block_size, max_num_seqs and max_num_batched_tokens must be >= 1")
        if self.kv_cache_gib <= 0:
            raise InvalidRequestError(f"kv_cache_gib must be > 0, got {self.kv_cache_gib}", "kv_cache_gib")
        if self.dtype not in DTYPES:
            raise InvalidRequestError(f"dtype must be one of {DTYPES}, got {self.dtype!r}", "dtype")
