"""Engine settings: one frozen dataclass, validated on construction. Its fields are flags of
every worker command (`pdmesh.option`)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from pdmesh.errors import InvalidRequestError
from pdmesh.option import option

DTYPES = ("float32", "bfloat16")
AUTO_DTYPE = ""  # --dtype unset: bfloat16 on CUDA, float32 on CPU (pdmesh.engine.device)
ATTENTION_BACKENDS = ("auto", "sdpa", "flex", "paged")
AUTO_DEVICE = ""  # --device unset: cuda when CUDA is available, else cpu (pdmesh.engine.device)
_DEVICE_FORM = re.compile(r"^(cpu|cuda(:\d+)?)$")
# Read by the engine (its KV and positions) and by the scheduler (its caps): one flag for both.
MAX_MODEL_LEN_OPTION = option("longest prompt + output in tokens (0: the model's context length)")


@dataclass(frozen=True, slots=True)
class EngineConfig:
    max_model_len: int = field(default=0, metadata=MAX_MODEL_LEN_OPTION)
    block_size: int = field(default=16, metadata=option("tokens per KV block"))
    kv_cache_gib: float = field(default=0.0, metadata=option(
        "memory for KV blocks, GiB (0: 1 GiB on CPU; on CUDA what --gpu-memory-utilization leaves)"))
    max_num_seqs: int = field(default=64, metadata=option("sequences in a running batch"))
    max_num_batched_tokens: int = field(default=4096, metadata=option("prompt tokens prefilled in one step"))
    prefill_chunk_tokens: int = field(default=0, metadata=option(
        "prefill prompts in chunks of at most this many tokens, one chunk per step, so running streams "
        "keep decoding between chunks: small chunks keep their inter-token latency, large ones give a "
        "long prompt its first token sooner (0: every prompt in one step)"))
    dtype: str = field(default=AUTO_DTYPE, metadata=option(
        "weights and KV dtype (unset: bfloat16 on CUDA, float32 on CPU; float32 is the token-exact mode)",
        choices=DTYPES))
    device: str = field(default=AUTO_DEVICE, metadata=option(
        "cpu, cuda or cuda:N (default: cuda when CUDA is available, else cpu); tensor-parallel rank i "
        "takes cuda:N+i"))
    gpu_memory_utilization: float = field(default=0.9, metadata=option(
        "fraction of the GPU's memory this worker may use; the KV pool gets what is left after the "
        "weights and a measured activation peak (CUDA only; pdmesh serve splits it among its workers)"))
    attention_backend: str = field(default="auto", metadata=option(
        "decode attention over the paged KV: sdpa gathers each context, flex (CUDA) and paged (a C++ "
        "kernel, CPU float32) read blocks in place (auto: flex on CUDA when it compiles, paged on CPU "
        "in float32 when it builds, else sdpa)", choices=ATTENTION_BACKENDS))
    prefix_cache: bool = field(default=True, metadata=option(
        "keep the KV of full prompt blocks after a request ends and reuse it for prompts that share "
        "the prefix (--no-prefix-cache: compute every prompt in full)"))

    def __post_init__(self):
        if self.max_model_len < 0:
            raise InvalidRequestError(f"max_model_len must be >= 0, got {self.max_model_len}", "max_model_len")
        if self.block_size < 1 or self.max_num_seqs < 1 or self.max_num_batched_tokens < 1:
            raise InvalidRequestError("block_size, max_num_seqs and max_num_batched_tokens must be >= 1")
        if self.prefill_chunk_tokens and self.prefill_chunk_tokens < self.block_size:
            raise InvalidRequestError(f"prefill_chunk_tokens must be 0 (off) or at least block_size "
                                      f"({self.block_size}), got {self.prefill_chunk_tokens}", "prefill_chunk_tokens")
        if self.kv_cache_gib < 0:
            raise InvalidRequestError(f"kv_cache_gib must be >= 0, got {self.kv_cache_gib}", "kv_cache_gib")
        if self.dtype not in (AUTO_DTYPE, *DTYPES):
            raise InvalidRequestError(f"dtype must be one of {DTYPES}, got {self.dtype!r}", "dtype")
        check_device_name(self.device)
        if not 0 < self.gpu_memory_utilization <= 1:
            raise InvalidRequestError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}",
                                      "gpu_memory_utilization")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise InvalidRequestError(f"attention_backend must be one of {ATTENTION_BACKENDS}, "
                                      f"got {self.attention_backend!r}", "attention_backend")


def check_device_name(name: str) -> None:
    """Refuse a --device value of the wrong form, without looking at the machine (the scheduler
    builds worker configs too); pdmesh.engine.device checks the machine."""
    if name != AUTO_DEVICE and not _DEVICE_FORM.match(name):
        raise InvalidRequestError(f"--device must be cpu, cuda or cuda:N, got {name!r}", "device")
