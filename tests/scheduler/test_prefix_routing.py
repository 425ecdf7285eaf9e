"""Cache-aware routing without sockets: workers report cached block hashes as the engine computes
them; the router prefers the worker holding the longest prompt prefix, within a load bound."""

from __future__ import annotations

from pdmesh.engine.prefix_hash import block_hashes, model_seed
from pdmesh.scheduler.pairing import Pairing
from pdmesh.scheduler.prefix_affinity import PromptBlocks
from pdmesh.scheduler.registry import WorkerLoad, WorkerRegistry
from pdmesh.scheduler.router import Router

MODEL = "smollm2"
SYSTEM = list(range(100, 100 + 64))  # 4 blocks of 16
PROMPT = SYSTEM + [7, 8, 9]


def hashes_of(tokens: list[int], model: str = MODEL) -> frozenset[int]:
    return frozenset(block_hashes(tokens, 16, model_seed(model)))


def registry_of(*workers: tuple[str, str, dict]) -> WorkerRegistry:
    registry = WorkerRegistry(heartbeat_timeout_s=3.0)
    for i, (worker_id, role, load) in enumerate(workers):
        settings = dict(kv_blocks_free=100, kv_blocks_total=100, block_size=16) | load
        registry.register(worker_id, role, f"127.0.0.1:{1000 + i}", 1, WorkerLoad(**settings),
                          pairing=Pairing(MODEL))
    return registry


def test_matched_tokens_count_leading_blocks_only():
    registry = registry_of(("all", "prefill", dict(cached_block_hashes=hashes_of(SYSTEM))),
                           ("half", "prefill", dict(cached_block_hashes=hashes_of(SYSTEM[:32]))),
                           ("tail", "prefill", dict(cached_block_hashes=hashes_of(SYSTEM) - hashes_of(SYSTEM[:16]))),
                           ("other", "prefill", dict(cached_block_hashes=hashes_of(SYSTEM, "other-model"))))
    prompt = PromptBlocks(PROMPT)
    matched = {w: prompt.matched_tokens(registry.workers[w]) for w in registry.workers}
    assert matched == {"all": 64, "half": 32, "tail": 0, "other": 0}
    # A prompt that is exactly the cached blocks still computes its last token: one block less.
    assert PromptBlocks(SYSTEM).matched_tokens(registry.workers["all"]) == 48


def test_prefill_goes_to_the_holder_until_its_queue_outweighs_the_saving():
    registry = registry_of(("holder", "prefill", dict(cached_block_hashes=hashes_of(SYSTEM))),
                           ("idle", "prefill", {}), ("d", "decode", {}))
    router = Router(registry)
    prompt = PromptBlocks(PROMPT)
    assert router.pick_prefill(prompt=prompt).worker_id == "holder"
    assert router.pick_prefill().worker_id in ("holder", "idle")  # no prompt: queue length alone
    holder = registry.workers["holder"]
    holder.pending_prompt_tokens = 63  # its queue + 3 uncached tokens < the idle worker's 67
    assert router.pick_prefill(prompt=prompt).worker_id == "holder"
    holder.pending_prompt_tokens = 65  # 68 > 67: the saving no longer pays for the wait
    assert router.pick_prefill(prompt=prompt).worker_id == "idle"


def test_affinity_never_piles_every_request_on_one_prefill_worker():
    registry = registry_of(("holder", "prefill", dict(cached_block_hashes=hashes_of(SYSTEM))),
                           ("idle", "prefill", {}), ("d", "decode", {}))
    router = Router(registry)
    decode = registry.workers["d"]
    chosen = []
    for i in range(40):  # a burst sharing the system prompt, before any heartbeat
        prompt = PromptBlocks(SYSTEM + [i, i + 1, i + 2])
        prefill = router.pick_prefill(prompt=prompt)
        router.assign(decode, prefill, prompt.num_tokens, prompt.num_tokens + 16, prompt)
        chosen.append(prefill.worker_id)
    # The holder computes 3 tokens a request, the other 67: the holder takes most, not all.
    assert chosen[0] == "holder" and 0 < chosen.count("idle") < chosen.count("holder")
    holder, idle = (registry.workers[w].pending_prompt_tokens for w in ("holder", "idle"))
    assert holder == 3 * chosen.count("holder") and idle == 67 * chosen.count("idle")
    assert abs(holder - idle) <= len(PROMPT)  # imbalance bounded by one prompt's saving


def test_decode_prefers_the_holder_within_the_load_bound():
    registry = registry_of(("holder", "decode", dict(kv_blocks_free=60, running=3,
                                                     cached_block_hashes=hashes_of(SYSTEM))),
                           ("roomy", "decode", dict(kv_blocks_free=100, running=2)))
    router = Router(registry)
    prompt = PromptBlocks(PROMPT)
    assert router.pick_decode(100).worker_id == "roomy"  # without a prompt: the most free blocks
    assert router.pick_decode(100, prompt=prompt).worker_id == "holder"
    registry.workers["holder"].pending_requests = 2  # 5 streams > max(2 x 1.5, 2 + 2)
    assert router.pick_decode(100, prompt=prompt).worker_id == "roomy"
    registry.workers["holder"].pending_requests = 0
    assert router.pick_decode(61 * 16, prompt=prompt).worker_id == "roomy"  # the holder lacks room
