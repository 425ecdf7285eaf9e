"""The synchronous engine: requests in, one step at a time, new tokens out.

Callers on other threads may add, abort, reserve and export at any moment; every change to the
queues and the block pool happens under one lock, and the forward pass runs outside it. Aborts
are applied at the next step boundary, so a forward pass never writes into blocks already given
to another sequence.

The engine runs on one device (`--device`): weights, KV pool, RoPE tables and sampling live there;
each step's batch is built on the host and moved once. On CUDA the KV pool is sized from
`--gpu-memory-utilization` after a profile step (`kv_budget`).
"""

from __future__ import annotations

import threading
import time

import torch

from pdmesh.engine.attention import AttentionBatch
from pdmesh.engine.batch_scheduler import BatchScheduler, ScheduledStep
from pdmesh.engine import kv_budget
from pdmesh.engine.block_pool import BlockPool
from pdmesh.engine.device import device_uuid, place_weights, resolve_device, resolve_dtype, use_device
from pdmesh.engine.engine_config import EngineConfig
from pdmesh.engine.flex_decode import decode_backend_for
from pdmesh.engine.kv_cache import KVCache, KVLayout
from pdmesh.engine.model import AllReduce, LlamaModel
from pdmesh.engine.model_config import ModelConfig
from pdmesh.engine.prefix_hash import model_seed
from pdmesh.engine.sampler import sample
from pdmesh.engine.sequence import EngineOutput, EngineRequest, Sequence, SequenceStatus
from pdmesh.engine.request_checks import check_prompt_ids
from pdmesh.errors import EngineError, InvalidRequestError


class LLMEngine:
    def __init__(self, model_config: ModelConfig, weights: dict[str, torch.Tensor],
                 config: EngineConfig = EngineConfig(), all_reduce: AllReduce | None = None,
                 kv_head_ids: tuple[int, ...] | None = None, model=None):
        """model: a stand-in with LlamaModel's forward() (e.g. EchoModel, a tensor-parallel driver, whose
        weights are on the device already); None builds the real one on the configured device."""
        self.model_config = model_config
        self.config = config
        self.max_model_len = min(config.max_model_len or model_config.max_position_embeddings,
                                 model_config.max_position_embeddings)
        self.device = resolve_device(config.device)
        use_device(self.device)
        dtype = resolve_dtype(config.dtype, self.device)
        if model is None:
            model = LlamaModel(model_config, place_weights(weights, dtype, self.device), self.max_model_len,
                               all_reduce, decode_backend_for(config.attention_backend, self.device, dtype),
                               config.max_num_seqs)
        self.model = model
        self.layout = KVLayout(model_config.num_layers, model_config.num_kv_heads, model_config.head_dim,
                               dtype, kv_head_ids or tuple(range(model_config.num_kv_heads)),
                               device=self.device.type, device_id=device_uuid(self.device))
        self.local_layout = self.layout  # this process's KV heads (a tensor-parallel group widens self.layout)
        num_blocks = self._num_blocks()
        self.cache = KVCache(self.layout, num_blocks, config.block_size, self.device)
        self.pool = BlockPool(num_blocks, config.block_size)
        self.scheduler = BatchScheduler(self.pool, config, self.max_model_len, model_seed(model_config.name))
        self.lock = threading.RLock()
        self._sequences: dict[str, Sequence] = {}
        self._aborts: set[str] = set()
        self.num_steps = 0
        self.last_step_s = 0.0

    def _num_blocks(self) -> int:
        per_block = KVCache.bytes_per_block(self.layout, self.config.block_size)
        if self.config.kv_cache_gib or self.device.type != "cuda":
            return max(1, int((self.config.kv_cache_gib or kv_budget.CPU_DEFAULT_GIB) * kv_budget.GIB) // per_block)
        kv_budget.reset_peak(self.device)
        self.profile_step()
        kv_bytes = kv_budget.kv_pool_bytes(kv_budget.measure(self.device), self.config.gpu_memory_utilization)
        return max(1, kv_bytes // per_block)

    def profile_step(self) -> None:
        """One forward pass of the largest prefill step the scheduler can form (into a throwaway
        KV cache just big enough), so the activation peak is measured before the pool is sized."""
        block_size = self.config.block_size
        longest = max(1, self.max_model_len - 1)
        remaining, lens = min(self.config.max_num_batched_tokens, longest * self.config.max_num_seqs), []
        while remaining > 0:
            lens.append(min(remaining, longest))
            remaining -= lens[-1]
        blocks = [-(-n // block_size) for n in lens]
        cache = KVCache(self.local_layout, sum(blocks), block_size, self.device)
        starts = [sum(blocks[:i]) for i in range(len(blocks))]
        prefill = [(list(range(start, start + nb)), 0, n) for start, nb, n in zip(starts, blocks, lens)]
        batch = AttentionBatch.build(cache, prefill, [])
        num_tokens = sum(lens)
        ids = torch.arange(num_tokens) % self.model_config.vocab_size
        positions = torch.cat([torch.arange(n) for n in lens])
        rows = torch.arange(num_tokens)[-min(num_tokens, self.config.max_num_seqs):]  # the widest logits a step makes
        self.model.forward(ids, positions, batch, cache, rows)

    # -- calls from any thread -------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    @property
    def num_total_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def num_cached_blocks(self) -> int:
        return self.pool.num_cached_blocks

    def prefix_cache_stats(self) -> tuple[int, int]:
        """(prompt tokens looked up in the prefix cache, tokens found there), since start."""
        cache = self.scheduler.prefix_cache
        return cache.num_queried_tokens, cache.num_hit_tokens

    def cached_block_hashes(self, limit: int) -> list[int]:
        """Up to `limit` hashes of cached blocks, the most recently used first."""
        with self.lock:
            return self.pool.cached_hashes()[::-1][:limit]

    def has_work(self) -> bool:
        with self.lock:
            return bool(self.scheduler.num_unfinished or self._aborts)

    def load(self) -> tuple[int, int]:
        """(running sequences, waiting sequences)."""
        with self.lock:
            return len(self.scheduler.running), len(self.scheduler.waiting) + len(self.scheduler.prefilling)

    def validate(self, prompt_ids: list[int], max_tokens: int) -> None:
        """Raise InvalidRequestError if this request could never run here."""
        check_prompt_ids(prompt_ids, self.model_config.vocab_size)
        if len(prompt_ids) >= self.max_model_len:
            raise InvalidRequestError(
                f"prompt has {len(prompt_ids):,} tokens; max-model-len is {self.max_model_len:,}", "prompt")
        self.scheduler.check_fits(len(prompt_ids) + max_tokens)

    def add_request(self, request: EngineRequest) -> None:
        self.validate(request.prompt_ids, request.params.max_tokens)
        stop_ids = set(request.params.stop_token_ids)
        if not request.params.ignore_eos:
            stop_ids.update(self.model_config.eos_token_ids)
        seq = Sequence(request, frozenset(stop_ids))
        with self.lock:
            if request.request_id in self._sequences:
                raise InvalidRequestError(f"request id {request.request_id!r} is already running", "request_id")
            self._sequences[request.request_id] = seq
            self.scheduler.add(seq)

    def abort(self, request_id: str) -> None:
        """Stop a request; its blocks are freed at the next step boundary."""
        with self.lock:
            if request_id in self._sequences:
                self._aborts.add(request_id)

    def reserve(self, request_id: str, num_tokens: int, prompt_ids: list[int] | None = None) -> int:
        """Blocks for a request arriving later (its KV computed elsewhere). With prompt_ids, the
        reservation shares the cached blocks of the prompt's prefix; returns the leading prompt
        tokens it holds so (the request's KV then starts there: EngineRequest.kv_start)."""
        with self.lock:
            return self.scheduler.reserve(request_id, num_tokens, prompt_ids)

    def release_reservation(self, request_id: str) -> bool:
        with self.lock:
            return self.scheduler.release_reservation(request_id)

    def export_kv(self, request_id: str, start: int = 0) -> torch.Tensor:
        """KV of a held (prefill-only) sequence's prompt from token `start` on (what the receiver
        lacks): [layers, 2, tokens - start, local kv heads, D]."""
        with self.lock:
            seq = self.scheduler.held.get(request_id)
            if seq is None:
                raise EngineError(f"request {request_id!r} holds no prefilled KV")
            if not 0 <= start < seq.num_prompt_tokens:
                raise EngineError(f"KV export of {request_id!r} from token {start:,}: "
                                  f"its prompt has {seq.num_prompt_tokens:,}")
            return self.cache.export(seq.block_ids, seq.num_prompt_tokens, start)

    def release_held(self, request_id: str) -> int:
        """Free a held prompt's KV; returns the number of blocks freed (0: nothing was held)."""
        with self.lock:
            seq = self.scheduler.held.get(request_id)
            if seq is None:
                return 0
            freed = len(seq.block_ids)
            self._retire(seq)
            return freed

    # -- the engine thread -----------------------------------------------------------------

    def step(self) -> list[EngineOutput]:
        """Run one batch; returns the new tokens of every sequence that ran or ended."""
        with self.lock:
            outputs = self._apply_aborts()
            step = self.scheduler.schedule()
            outputs += self._import(step)
        if not (step.prefill or step.decode):
            return outputs
        start = time.perf_counter()
        try:
            tokens = self._run(step)
        except Exception as exc:  # one bad batch fails its sequences, not the engine
            with self.lock:
                return outputs + [self._fail(seq, exc) for seq in step.prefill + step.decode]
        self.last_step_s = time.perf_counter() - start
        self.num_steps += 1
        with self.lock:
            for seq in step.prefill:
                seq.num_computed_tokens = seq.prefill_end
                self.scheduler.prefix_cache.cache_computed(seq)  # shareable before it finishes
            for seq in step.decode:
                seq.num_computed_tokens = seq.num_tokens  # the KV of every token fed so far is written
            for seq, token in zip(sampled_sequences(step), tokens):
                if not seq.aborted:
                    outputs.append(self._append(seq, token))
        return outputs

    def _apply_aborts(self) -> list[EngineOutput]:
        outputs = []
        for request_id in self._aborts:
            seq = self._sequences.get(request_id)
            if seq is not None:
                seq.aborted = True
                self._retire(seq)
                outputs.append(EngineOutput(request_id, [], "abort", num_prompt_tokens=seq.num_prompt_tokens))
        self._aborts.clear()
        return outputs

    def _import(self, step: ScheduledStep) -> list[EngineOutput]:
        outputs = []
        for seq in step.imported:
            try:
                self.cache.import_(seq.block_ids, seq.request.kv, seq.request.kv_start)
            except EngineError as exc:
                outputs.append(self._fail(seq, exc))
                continue
            seq.request.kv = None  # the cache has it now; drop the transfer buffer
            seq.num_computed_tokens = seq.num_prompt_tokens
            self.scheduler.prefix_cache.cache_computed(seq)
            outputs.append(self._append(seq, seq.request.first_token))
        return outputs

    def _run(self, step: ScheduledStep) -> list[int]:
        """Feed the step's prompt chunks and decode tokens through the model; returns one token per
        sequence of sampled_sequences(step) (a prompt's last chunk samples its first token)."""
        ids, positions, rows = [], [], []
        for seq in step.prefill:  # only what the prefix cache and earlier chunks do not hold
            ids += seq.request.prompt_ids[seq.num_computed_tokens:seq.prefill_end]
            positions += range(seq.num_computed_tokens, seq.prefill_end)
            if seq.prefill_end == seq.num_prompt_tokens:
                rows.append(len(ids) - 1)
        for seq in step.decode:
            ids.append(seq.output_ids[-1])
            positions.append(seq.num_tokens - 1)
            rows.append(len(ids) - 1)
        batch = AttentionBatch.build(self.cache, [(s.block_ids, s.num_computed_tokens, s.prefill_end)
                                                  for s in step.prefill],
                                     [(s.block_ids, s.num_tokens) for s in step.decode])
        logits = self.model.forward(torch.tensor(ids), torch.tensor(positions), batch, self.cache,
                                    torch.tensor(rows, dtype=torch.long))
        seqs = sampled_sequences(step)
        if not seqs:
            return []
        return sample(logits, [s.params for s in seqs], [s.request.output_offset + len(s.output_ids) for s in seqs])

    def _append(self, seq: Sequence, token: int) -> EngineOutput:
        seq.output_ids.append(token)
        reason = seq.finish_reason_after(token, self.max_model_len)
        output = EngineOutput(seq.request_id, [token], reason, num_prompt_tokens=seq.num_prompt_tokens)
        if len(seq.output_ids) == 1:
            output.num_cached_tokens = seq.num_cached_tokens
            if seq.scheduled is not None:
                output.queue_s = seq.scheduled - seq.arrival
        if reason is None and seq.request.prefill_only:
            self.scheduler.hold(seq)
            output.finish_reason = "prefilled"
        elif reason is None:
            if seq.status is not SequenceStatus.RUNNING:
                self.scheduler.start_running(seq)
        else:
            self._retire(seq)
        return output

    def _fail(self, seq: Sequence, exc: Exception) -> EngineOutput:
        self._retire(seq)
        return EngineOutput(seq.request_id, [], "error", error=f"{type(exc).__name__}: {exc}",
                            num_prompt_tokens=seq.num_prompt_tokens)

    def _retire(self, seq: Sequence) -> None:
        self.scheduler.finish(seq)
        self._sequences.pop(seq.request_id, None)


def sampled_sequences(step: ScheduledStep) -> list[Sequence]:
    """The sequences that get a token this step: prompts whose last chunk ran, then the decodes."""
    return [s for s in step.prefill if s.prefill_end == s.num_prompt_tokens] + step.decode
