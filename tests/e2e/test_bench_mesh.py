"""`pdmesh bench` against a real echo mesh (conftest's echo_mesh: key k-free, 20 ms a step), through
gRPC and the OpenAI HTTP API, with tiny loads: the CLI end to end, JSON, plots, compare."""

from __future__ import annotations

import json
import subprocess
import sys


def bench(*flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pdmesh.cli", "bench", "--api-key", "k-free", "--no-progress",
                           "--warmup", "1", *flags], capture_output=True, text=True, timeout=300)


def test_compare_grpc_and_http_closed_loop(echo_mesh, tmp_path):
    done = bench("--compare", f"grpc://{echo_mesh.address},{echo_mesh.http_url}", "--requests", "6",
                 "--concurrency", "3", "--prompt-tokens", "16", "--output-tokens", "8", "--slo-ttft", "5",
                 "--json", str(tmp_path / "bench.json"), "--plot", str(tmp_path / "bench.png"))
    assert done.returncode == 0, done.stderr + done.stdout
    assert "ratio 2/1" in done.stdout and "TTFT p99 ms" in done.stdout and "statuses" in done.stdout
    results = json.loads((tmp_path / "bench.json").read_text())["results"]
    assert [r["summary"]["target"] for r in results] == [f"grpc://{echo_mesh.address}", echo_mesh.http_url]
    for result in results:
        summary = result["summary"]
        assert summary["statuses"] == {"OK": 6} and summary["num_ok"] == 6
        assert summary["output_throughput"] > 0 and summary["goodput"] > 0
        assert summary["itl"]["p50"] > 0.01  # echo steps take 20 ms
        assert all(r["output_tokens"] == 8 and r["prompt_tokens"] == 16 for r in result["requests"])
    assert (tmp_path / "bench.png").read_bytes()[:4] == b"\x89PNG"


def test_open_loop_chat_mix_over_http_chat(echo_mesh, tmp_path):
    done = bench("--target", echo_mesh.http_url, "--endpoint", "chat", "--requests", "8", "--rate", "20",
                 "--burstiness", "0.5", "--lengths", "chat", "--prompt-tokens", "40", "--output-tokens", "6",
                 "--shared-prefix", "8", "--seed", "3", "--json", str(tmp_path / "bench.json"))
    assert done.returncode == 0, done.stderr + done.stdout
    summary = json.loads((tmp_path / "bench.json").read_text())["results"][0]["summary"]
    assert summary["num_ok"] == 8 and "open loop at 20 req/s" in done.stdout


def test_errors_are_counted_by_status(echo_mesh):
    done = bench("--target", echo_mesh.address, "--requests", "3", "--prompt-tokens", "600", "--warmup", "0")
    assert done.returncode == 1  # nothing succeeded
    assert "INVALID_ARGUMENT 3" in done.stdout
