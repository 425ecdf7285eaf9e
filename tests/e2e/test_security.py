"""Security of a running mesh (`pdmesh serve` on the echo engine, tenants configured): an outsider
on the same host can call no internal RPC and cannot break the mesh; only holders of a cluster
certificate join a mesh with --tls-dir; the client port can speak TLS; operator calls need an
admin key. Every refusal leaves the services up and no KV block held."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
import pytest

from pdmesh.client import PdmeshClient
from pdmesh.client import build_request
from pdmesh.rpc.cluster_auth import CLUSTER_SECRET_KEY
from pdmesh.rpc.reflection_client import ReflectionClient
from support.mesh import start_mesh
from support.serve_chaos import wait_until

ECHO = ("--engine", "echo", "--echo-step-ms", "2", "--kv-cache-gib", "0.001", "--max-model-len", "512",
        "--default-max-tokens", "8")
OPS_KEY = "ops-key-1"
TENANTS = f"""
[tenants.app]
api_keys = ["app-key"]
[tenants.ops]
api_keys = ["sha256:{hashlib.sha256(OPS_KEY.encode()).hexdigest()}"]
admin = true
"""
INTERNAL_CALLS = {  # method -> a well-formed request: refused for who is calling, not for what
    "pdmesh.v1.Registry/Register": {"worker_id": "evil", "role": "decode", "address": "127.0.0.1:1"},
    "pdmesh.v1.Registry/Heartbeat": {"worker_id": "decode-0"},
    "pdmesh.v1.DecodeWorker/Generate": {"request_id": "x", "prompt_token_ids": [5, 6], "sampling": {"max_tokens": 2}},
    "pdmesh.v1.DecodeWorker/Drain": {},
    "pdmesh.v1.PrefillWorker/Prefill": {"request_id": "x", "prompt_token_ids": [5, 6]},
    "pdmesh.v1.PrefillWorker/PullKV": {"request_id": "x", "channel_id": "c", "tag": 0},
    "pdmesh.v1.PrefillWorker/ReleaseKV": {"request_id": "x"},
    "pdmesh.v1.PrefillWorker/OpenKVChannel": {"decode_worker_id": "evil", "store_host": "127.0.0.1",
                                              "store_port": 1, "channel_id": "c"},
    "pdmesh.v1.PrefillWorker/Drain": {},
}


SECRET_FILE = Path(tempfile.gettempdir()) / f"pdmesh-test-secret-{os.getpid()}" / "secret"


@pytest.fixture(scope="module")
def keyed_mesh(tmp_path_factory):
    folder = tmp_path_factory.mktemp("keyed")
    (folder / "tenants.toml").write_text(TENANTS)
    SECRET_FILE.parent.mkdir(parents=True, exist_ok=True)
    SECRET_FILE.write_text("operator-known-secret-" + os.urandom(8).hex())
    mesh = start_mesh(folder / "serve.log", *ECHO, "--tenants-file", str(folder / "tenants.toml"),
                      "--cluster-secret-file", str(SECRET_FILE))
    yield mesh
    assert mesh.stop() == 0
    assert not mesh.leftovers()


def ops_status(mesh):
    with PdmeshClient(mesh.address, api_key=OPS_KEY) as c:
        return c.cluster_status()


def internal_address(mesh) -> str:
    return re.findall(r"\(internal (\S+),", mesh.log_path.read_text())[-1]


def assert_mesh_intact(mesh):
    status = ops_status(mesh)
    assert sorted(w.worker_id for w in status.workers) == ["decode-0", "prefill-0"]
    assert all(w.healthy and w.state == "serving" for w in status.workers)
    with PdmeshClient(mesh.address, api_key="app-key", retries=0) as c:
        assert c.generate(prompt="hello", max_tokens=4).completion_tokens == 4
    wait_until(lambda: all(w.kv_blocks_free == w.kv_blocks_total for w in ops_status(mesh).workers), 10,
               "every KV block free")


def test_the_client_port_serves_only_the_client_api(keyed_mesh):
    with ReflectionClient(keyed_mesh.address) as client:
        assert sorted(client.list_services()) == ["grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection",
                                                  "pdmesh.v1.Scheduler"]


def test_outsider_can_call_no_internal_rpc(keyed_mesh):
    addresses = {w.role: w.address for w in ops_status(keyed_mesh).workers}
    where = {"Registry": internal_address(keyed_mesh), "DecodeWorker": addresses["decode"],
             "PrefillWorker": addresses["prefill"]}
    for method, request in INTERNAL_CALLS.items():
        with ReflectionClient(where[method.split(".")[2].split("/")[0]]) as client:
            with pytest.raises(grpc.RpcError) as err:
                list(client.call(method, request, timeout_s=5))
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED, method
        assert "internal to the mesh" in err.value.details()
    for _ in range(30):  # a flood of refusals costs a log line a minute per peer, not one per call
        with ReflectionClient(where["DecodeWorker"]) as client, pytest.raises(grpc.RpcError):
            list(client.call("pdmesh.v1.DecodeWorker/Drain", {}, timeout_s=5))
    refusals = keyed_mesh.log_path.read_text().count("no cluster credential (logged once a minute per peer)")
    assert 1 <= refusals <= 3  # one per process that refused (scheduler, decode, prefill)
    assert_mesh_intact(keyed_mesh)  # nothing drained, no rogue worker registered


def test_list_models_and_count_tokens_need_a_key_like_generate(keyed_mesh):
    for key in (None, "not-a-key"):
        with PdmeshClient(keyed_mesh.address, api_key=key, retries=0) as c:
            for call in (c.list_models, lambda: c.count_tokens(prompt="hi")):
                with pytest.raises(grpc.RpcError) as err:
                    call()
                assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with PdmeshClient(keyed_mesh.address, api_key="app-key", retries=0) as c:
        assert len(c.list_models()) == 1 and c.count_tokens(prompt="hi")


def test_cluster_status_needs_an_admin_key(keyed_mesh):
    for key, code in ((None, grpc.StatusCode.UNAUTHENTICATED), ("app-key", grpc.StatusCode.PERMISSION_DENIED)):
        with PdmeshClient(keyed_mesh.address, api_key=key, retries=0) as c:
            with pytest.raises(grpc.RpcError) as err:
                c.cluster_status()
        assert err.value.code() == code
    assert len(ops_status(keyed_mesh).workers) == 2  # the ops key is listed only as its sha256


def test_transport_abuse_is_refused_clearly(keyed_mesh):
    channel = grpc.insecure_channel(keyed_mesh.address, options=[("grpc.max_send_message_length", 2**27)])
    generate = channel.unary_stream("/pdmesh.v1.Scheduler/Generate")
    auth = (("authorization", "Bearer app-key"),)
    with pytest.raises(grpc.RpcError) as err:  # 64 MiB body
        list(generate(b"\x0a" + b"\xff\xff\xff\x1f" + b"x" * (64 * 2**20), metadata=auth, timeout=30))
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    garbage = [os.urandom(n) + b"\xff\xff" for n in (1, 17, 300)]
    for method in ("Generate", "CountTokens", "ListModels", "GetClusterStatus"):
        call = (channel.unary_stream if method == "Generate" else channel.unary_unary)(f"/pdmesh.v1.Scheduler/{method}")
        for body in garbage:
            with pytest.raises(grpc.RpcError) as err:
                result = call(b"\x0a\xff" + body, metadata=auth, timeout=10)
                list(result) if method == "Generate" else result
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (method, err.value.details())
            assert "is not a valid pdmesh.v1." in err.value.details()
    channel.close()
    with PdmeshClient(keyed_mesh.address, api_key="app-key", retries=0) as c:
        for stop, needle in (([str(i) for i in range(10_000)], "stop has 10,000 strings; the limit is 16"),
                             (["x" * 2**20], "stop[0] has 1,048,576 characters; the limit is 256")):
            with pytest.raises(grpc.RpcError) as err:
                c.generate(prompt="hi", max_tokens=2, stop=stop)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and needle in err.value.details()
    assert_mesh_intact(keyed_mesh)


def test_internal_rpcs_with_the_credential(keyed_mesh):
    """The mesh's own callers (here: the operator's debug CLI with the secret file) get through,
    and a body that does not parse is INVALID_ARGUMENT there too; the secret is in no child's
    command line or environment."""
    secret = SECRET_FILE.read_text().strip()
    for pid in keyed_mesh.live_children():
        for part in ("cmdline", "environ"):
            assert secret.encode() not in open(f"/proc/{pid}/{part}", "rb").read()
    addresses = {w.role: w.address for w in ops_status(keyed_mesh).workers}
    metadata = ((CLUSTER_SECRET_KEY, secret),)
    for role, method in (("decode", "/pdmesh.v1.DecodeWorker/Generate"), ("prefill", "/pdmesh.v1.PrefillWorker/ReleaseKV")):
        with grpc.insecure_channel(addresses[role]) as channel:
            call = (channel.unary_stream if method.endswith("Generate") else channel.unary_unary)(method)
            with pytest.raises(grpc.RpcError) as err:
                result = call(b"\x0a\xff\xff\xff", metadata=metadata, timeout=5)
                list(result) if method.endswith("Generate") else result
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    with ReflectionClient(addresses["prefill"], metadata=metadata) as client:
        assert client.call_unary("pdmesh.v1.PrefillWorker/ReleaseKV", {"request_id": "nothing-held"}) == {}
    assert_mesh_intact(keyed_mesh)


def test_many_streams_and_dropped_connections_leave_nothing_behind(keyed_mesh):
    scheduler = next(p for p in keyed_mesh.live_children()
                     if b"pdmesh.child\x00scheduler" in open(f"/proc/{p}/cmdline", "rb").read())
    rss_before = _rss_mib(scheduler)
    channel = grpc.insecure_channel(keyed_mesh.address)
    generate = channel.unary_stream("/pdmesh.v1.Scheduler/Generate",
                                    request_serializer=lambda r: r.SerializeToString())
    request = build_request(prompt="hi", max_tokens=4)
    calls = [generate(request, metadata=(("authorization", "Bearer app-key"),), timeout=120) for _ in range(2000)]
    codes, details = {}, set()
    for call in calls:
        try:
            list(call)
            codes["OK"] = codes.get("OK", 0) + 1
        except grpc.RpcError as exc:
            codes[exc.code().name] = codes.get(exc.code().name, 0) + 1
            details.add(exc.details()[:150])
    channel.close()
    # Served; or refused at once with a reason: queue full, or (on a loaded machine) heartbeats late
    # enough that no worker was routable for a moment; or refused by HTTP/2 itself before the client
    # learned the connection's max_concurrent_streams (REFUSED_STREAM: never processed).
    assert set(codes) <= {"OK", "RESOURCE_EXHAUSTED", "UNAVAILABLE"}, (codes, details)
    reasons = ("RST_STREAM with error code 7", "queue", "no healthy decode worker")
    assert all(any(r in d for r in reasons) for d in details), details
    assert codes.get("OK", 0) >= 100
    for _ in range(500):  # open, start a stream, drop the connection
        dropped = grpc.insecure_channel(keyed_mesh.address)
        dropped.unary_stream("/pdmesh.v1.Scheduler/Generate", request_serializer=lambda r: r.SerializeToString())(
            request, metadata=(("authorization", "Bearer app-key"),), timeout=30)
        dropped.close()
    assert_mesh_intact(keyed_mesh)
    assert _rss_mib(scheduler) - rss_before < 200, (rss_before, _rss_mib(scheduler))


def _rss_mib(pid: int) -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def test_a_reader_that_never_reads_is_cut_off_and_its_kv_freed(tmp_path):
    mesh = start_mesh(tmp_path / "serve.log", "--engine", "echo", "--kv-cache-gib", "0.01", "--max-model-len",
                      "8192", "--client-stall-timeout", "2", "--no-warmup")
    try:
        # A small receive window and no BDP probing: the server's writes wait on this reader soon.
        channel = grpc.insecure_channel(mesh.address, options=[("grpc.http2.lookahead_bytes", 4096),
                                                               ("grpc.http2.bdp_probe", 0)])
        stalled = channel.unary_stream("/pdmesh.v1.Scheduler/Generate",
                                       request_serializer=lambda r: r.SerializeToString())(
            build_request(prompt="hi", max_tokens=8000, ignore_eos=True), timeout=120)
        time.sleep(1)  # it runs, then the window fills: the scheduler's writes wait on a reader that never reads
        with mesh.client() as c:
            wait_until(lambda: sum(w.running for w in c.cluster_status().workers) == 0
                       and all(w.kv_blocks_free == w.kv_blocks_total for w in c.cluster_status().workers), 30,
                       "the stalled stream cancelled and its KV freed")
        with pytest.raises(grpc.RpcError) as err:
            list(stalled)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "read nothing of its stream for 2s" in err.value.details()
        channel.close()
    finally:
        assert mesh.stop() == 0


def test_mutual_tls_only_cluster_certificates_join(tmp_path):
    cluster, stranger = tmp_path / "cluster", tmp_path / "stranger"
    for folder in (cluster, stranger):
        subprocess.run([sys.executable, "-m", "pdmesh.cli", "certs", str(folder)], check=True, capture_output=True)
    assert oct((cluster / "scheduler-key.pem").stat().st_mode & 0o777) == "0o600"
    mesh = start_mesh(tmp_path / "serve.log", *ECHO, "--tls-dir", str(cluster), "--tls-cert",
                      str(cluster / "scheduler.pem"), "--tls-key", str(cluster / "scheduler-key.pem"))
    try:
        assert "warm-up: 'What is the capital of France?'" in mesh.log_path.read_text()  # served over mTLS
        with PdmeshClient(mesh.address, tls_ca=str(cluster / "ca.pem")) as c:  # client port: TLS
            assert c.generate(prompt="hi", max_tokens=3).completion_tokens == 3
            workers = c.cluster_status().workers
        with PdmeshClient(mesh.address, retries=0, timeout_s=5) as c:  # plaintext to a TLS port
            with pytest.raises(grpc.RpcError):
                c.generate(prompt="hi", max_tokens=3)
        internal = internal_address(mesh)
        env = {**os.environ, "PDMESH_CLUSTER_SECRET": "not-the-mesh"}
        intruder = subprocess.Popen([sys.executable, "-m", "pdmesh.cli", "decode", "--scheduler", internal,
                                     "--tls-dir", str(stranger), "--engine", "echo", "--kv-cache-gib", "0.001",
                                     "--worker-id", "intruder", "--max-model-len", "512"],
                                    env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            time.sleep(8)  # long enough to have registered (a worker registers within a second of start)
            with PdmeshClient(mesh.address, tls_ca=str(cluster / "ca.pem")) as c:
                assert sorted(w.worker_id for w in c.cluster_status().workers) == sorted(w.worker_id for w in workers)
        finally:
            intruder.kill()
            intruder.wait()
    finally:
        assert mesh.stop() == 0
    assert not mesh.leftovers()
