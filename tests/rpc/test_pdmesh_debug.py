"""tools/pdmesh_debug.py against a real server (built-in path), and its grpcurl command lines."""

from __future__ import annotations

import json
import os

import pytest

SCHEDULER = ["--scheduler-service", "pdmeshtest.v1.Scheduler"]


@pytest.fixture
def run(cli, addr, capsys):
    """main(["--builtin", "--addr", addr, *argv]) -> (exit status, stdout, stderr)."""

    def run(*argv: str) -> tuple[int, str, str]:
        status = cli.main(["--builtin", "--addr", addr, *argv])
        out, err = capsys.readouterr()
        return status, out, err

    return run


def test_list(run):
    status, out, _ = run("list")
    assert status == 0
    assert out.splitlines() == [
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
        "pdmeshtest.v1.Echo",
        "pdmeshtest.v1.Scheduler",
    ]


def test_health(run):
    assert run("health") == (0, "SERVING\n", "")
    assert run("health", "pdmeshtest.v1.Echo") == (0, "SERVING\n", "")


def test_health_of_unknown_service_fails(run):
    status, out, err = run("health", "pdmeshtest.v1.Nope")
    assert status == 1 and out == ""
    assert err.startswith("ERROR: NOT_FOUND")


def test_describe(run):
    status, out, _ = run("describe", "pdmeshtest.v1.Echo")
    assert status == 0
    assert "rpc Count(pdmeshtest.v1.CountRequest) returns (stream pdmeshtest.v1.CountReply);" in out


def test_call_unary_and_streaming(run):
    status, out, _ = run("call", "pdmeshtest.v1.Echo/Say", '{"text": "hello"}')
    assert (status, json.loads(out)) == (0, {"text": "hello"})
    status, out, _ = run("call", "pdmeshtest.v1.Echo/Count", '{"n": 2}')
    assert status == 0
    assert out.count("{") == 2 and '"i": 1' in out


def test_call_error_prints_code_and_rich_details(run):
    status, out, err = run("call", "pdmeshtest.v1.Echo/Fail", '{"error": "ResourceExhaustedError"}')
    assert status == 1 and out == ""
    first, rest = err.split("\n", 1)
    assert first == "ERROR: RESOURCE_EXHAUSTED: queue holds 64 of 64 requests"
    assert json.loads(rest)["retry_delay_s"] == 2.5


def test_call_with_bad_json_fails_cleanly(run):
    status, _, err = run("call", "pdmeshtest.v1.Echo/Say", "{oops")
    assert status == 1 and err.startswith("ERROR: bad pdmeshtest.v1.SayRequest JSON")


def test_generate_prints_deltas_then_summary(run):
    status, out, err = run(*SCHEDULER, "generate", "hello", "--max-tokens", "3", "--raw")
    assert (status, out) == (0, "HEL\n")
    assert json.loads(err) == {
        "finish_reason": "length",
        "usage": {"prompt_tokens": 5, "completion_tokens": 3},
    }


def test_status(run):
    status, out, _ = run(*SCHEDULER, "status")
    assert status == 0
    assert json.loads(out) == {"worker_ids": ["prefill-0", "decode-0"]}


@pytest.fixture
def fake_grpcurl(tmp_path, monkeypatch):
    """A `grpcurl` on PATH that prints its arguments, one per line."""
    script = tmp_path / "grpcurl"
    script.write_text('#!/bin/sh\nfor arg in "$@"; do echo "$arg"; done\n')
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    return script


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["list"], ["-plaintext", "h:1", "list"]),
        (["describe", "pdmesh.v1.Scheduler"], ["-plaintext", "h:1", "describe", "pdmesh.v1.Scheduler"]),
        (["health"], ["-plaintext", "-d", '{"service": ""}', "h:1", "grpc.health.v1.Health/Check"]),
        (["generate", "Hi", "--max-tokens", "4", "--raw"],
         ["-plaintext", "-d", '{"prompt": "Hi", "max_tokens": 4}', "h:1", "pdmesh.v1.Scheduler/Generate"]),
        (["generate", "Hi", "--max-tokens", "4"],  # chat form by default: an instruct model answers
         ["-plaintext", "-d", '{"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}', "h:1",
          "pdmesh.v1.Scheduler/Generate"]),
        (["--api-key", "k1", "--tls-ca", "/ca.pem", "status"],
         ["-cacert", "/ca.pem", "-H", "authorization: Bearer k1", "-d", "{}", "h:1",
          "pdmesh.v1.Scheduler/GetClusterStatus"]),
        (["status"], ["-plaintext", "-d", "{}", "h:1", "pdmesh.v1.Scheduler/GetClusterStatus"]),
        (["--timeout", "2", "call", "a.B/C", '{"x": 1}'],
         ["-plaintext", "-max-time", "2.0", "-d", '{"x": 1}', "h:1", "a.B/C"]),
    ],
)
def test_grpcurl_on_path_gets_the_command(cli, fake_grpcurl, capfd, argv, expected):
    assert cli.main(["--addr", "h:1", *argv]) == 0
    assert capfd.readouterr().out.splitlines() == expected


def test_builtin_flag_skips_grpcurl(cli, fake_grpcurl, addr, capsys):
    assert cli.main(["--builtin", "--addr", addr, "health"]) == 0
    assert capsys.readouterr().out == "SERVING\n"
