"""Engine settings: one frozen dataclass, validated on construction. Its fields are flags of
every worker command (`pdmesh.option`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from pdmesh.errors import InvalidRequestError
from pdmesh.option import option

DTYPES = ("float32", "bfloat16")
# Read by the engine (its KV and positions) and by the scheduler (its caps): one flag for both.
MAX_MODEL_LEN_OPTION = option("longest prompt + output in tokens (0: the model's context length)")


@dataclass(frozen=True, slots=True)
class EngineConfig:
    max_model_len: int = field(default=0, metadata=MAX_MODEL_LEN_OPTION)
    block_size: int = field(default=16, metadata=option("tokens per KV block"))
    kv_cache_gib: float = field(default=1.0, metadata=option("memory for KV blocks, GiB"))
    max_num_seqs: int = field(default=64, metadata=option("sequences in a running batch"))
    max_num_batched_tokens: int = field(default=4096, metadata=option("prompt tokens prefilled in one step"))
    dtype: str = field(default="float32", metadata=option(
        "weights and KV dtype (float32 is the token-exact mode)", choices=DTYPES))

    def __post_init__(self):
        if self.max_model_len < 0:
            raise InvalidRequestError(f"max_model_len must be >= 0, got {self.max_model_len}", "max_model_len")
        if self.block_size < 1 or self.max_num_seqs < 1 or self.max_num_batched_tokens < 1:
            raise InvalidRequestError("block_size, max_num_seqs and max_num_batched_tokens must be >= 1")
        if self.kv_cache_gib <= 0:
            raise InvalidRequestError(f"kv_cache_gib must be > 0, got {self.kv_cache_gib}", "kv_cache_gib")
        if self.dtype not in DTYPES:
            raise InvalidRequestError(f"dtype must be one of {DTYPES}, got {self.dtype!r}", "dtype")
