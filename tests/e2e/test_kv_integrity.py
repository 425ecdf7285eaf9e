"""Fail-closed hand-offs on the real SmolLM2 mesh (`pdmesh serve`), one mesh per injected fault:
greedy output identical to the engine alone, the fault counted, every KV block free afterwards,
and each answer's route saying what happened."""

from __future__ import annotations

import pytest

from support.mesh import LOCAL_PREFILL_THRESHOLD, engine_greedy, start_mesh
from support.metrics import metric

PROMPTS = [[1, 504, 3458, 282, 4649, 314, 3358, 30, 2],  # >= LOCAL_PREFILL_THRESHOLD: via the prefill worker
           [1, 1975, 253, 1345, 2053, 281, 253, 4718, 1119, 28, 2]]
NEW_TOKENS = 16
# fault -> (PDMESH_FAULTS, extra serve flags, (metric on the decode worker, labels) that must rise)
FAULTS = {
    "kv_corrupt": ("kv_corrupt=1", (), ("pdmesh_kv_handoff_corrupt_total", {"reason": "checksum"})),
    "kv_truncate": ("kv_truncate=1", (), ("pdmesh_kv_handoff_corrupt_total", {"reason": "short"})),
    "kv_delay_ms": ("kv_delay_ms=4000", ("--kv-timeout", "2"),
                    ("pdmesh_kv_handoff_corrupt_total", {"reason": "timeout"})),
    "prefill_crash": ("prefill_crash=1", (), ("pdmesh_prefill_fallbacks_total", {"target": "local"})),
}


@pytest.fixture(params=list(FAULTS), scope="module")
def faulty_mesh(request, tmp_path_factory, smollm2_path):
    spec, flags, _ = FAULTS[request.param]
    log = tmp_path_factory.mktemp(request.param) / "serve.log"
    mesh = start_mesh(log, "--prefill-workers", "1", "--decode-workers", "1", "--kv-cache-gib", "0.1",
                      "--max-model-len", "1024", "--local-prefill-threshold", str(LOCAL_PREFILL_THRESHOLD),
                      "--prefill-threads", "1", "--decode-threads", "1", *flags, env={"PDMESH_FAULTS": spec})
    yield request.param, mesh
    mesh.stop()
    assert not mesh.leftovers(), f"processes left behind: {mesh.leftovers()}"


def test_fault_is_caught_recomputed_and_counted(faulty_mesh, reference_engine):
    fault, mesh = faulty_mesh
    _, _, (name, labels) = FAULTS[fault]
    assert all(len(p) >= LOCAL_PREFILL_THRESHOLD for p in PROMPTS)
    [decode] = mesh.workers("decode")
    before = metric(decode.metrics_address, name, **labels)
    with mesh.client(timeout_s=120) as client:
        for prompt in PROMPTS:
            done = client.generate(prompt_token_ids=prompt, max_tokens=NEW_TOKENS, ignore_eos=True)
            assert list(done.token_ids) == engine_greedy(reference_engine, prompt, NEW_TOKENS)
            route = done.route
            assert route.decode_worker_ids == (decode.worker_id,) and route.resumes == 0
            assert route.prefill_worker_id == ""  # the one prefill worker failed: recomputed locally
            if fault == "prefill_crash":
                assert route.prefill_fallbacks in (0, 1)  # 0: routed locally while the worker restarted
            else:
                assert route.prefill_fallbacks == 1 and route.kv_recomputes == 1
    assert metric(decode.metrics_address, name, **labels) >= before + (1 if fault == "prefill_crash" else 2)
    workers = mesh.wait_all_blocks_free()
    assert all(w.kv_blocks_free == w.kv_blocks_total for w in workers), workers
    if fault == "prefill_crash":
        assert next(w for w in mesh.workers("prefill")).restarts >= 1  # serve brought it back
