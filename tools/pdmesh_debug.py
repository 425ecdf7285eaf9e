"""Debug a running pdmesh service over gRPC, with nothing but server reflection.

    python tools/pdmesh_debug.py list
    python tools/pdmesh_debug.py describe pdmesh.v1.Scheduler
    python tools/pdmesh_debug.py health [SERVICE]
    python tools/pdmesh_debug.py generate "Once upon a time" --max-tokens 32
    python tools/pdmesh_debug.py status
    python tools/pdmesh_debug.py call pdmesh.v1.Scheduler/GetClusterStatus '{}'

`--addr host:port` picks the server (default 127.0.0.1:50051). `generate` sends a chat message
(the model's chat template applies; `--raw` sends the text as a plain prompt). `--api-key KEY`
authenticates as a tenant, `--tls-ca FILE` speaks TLS to a client port that has it, and
`--cluster-secret-file FILE` calls a worker's or the scheduler's internal RPCs as the mesh itself.
When `grpcurl` is on PATH the command is handed to grpcurl (its output format) unless `--builtin`
is given; otherwise pdmesh.rpc.reflection_client does the work. Exit status: 0 on success, 1 when the call failed or
health is not SERVING, 2 on bad usage.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from typing import Any, Callable

import grpc

from pdmesh.errors import PdmeshError
from pdmesh.rpc.cluster_auth import CLUSTER_SECRET_KEY
from pdmesh.rpc.errors import rich_details
from pdmesh.rpc.reflection_client import ReflectionClient

DEFAULT_ADDR = "127.0.0.1:50051"
SCHEDULER = "pdmesh.v1.Scheduler"
HEALTH_CHECK = "grpc.health.v1.Health/Check"


def build_parser() -> argparse.ArgumentParser:
    """The argument parser: global flags plus one subcommand per action."""
    parser = argparse.ArgumentParser(prog="pdmesh_debug", description=__doc__.splitlines()[0])
    parser.add_argument("--addr", default=DEFAULT_ADDR, help="server host:port")
    parser.add_argument("--builtin", action="store_true", help="never shell out to grpcurl")
    parser.add_argument("--timeout", type=float, default=None, help="per-call deadline, seconds")
    parser.add_argument("--scheduler-service", default=SCHEDULER, help="full name of the scheduler")
    parser.add_argument("--api-key", default=None, help="tenant API key (authorization: Bearer KEY)")
    parser.add_argument("--tls-ca", default=None, help="CA certificate (PEM): speak TLS, trusting this CA")
    parser.add_argument("--cluster-secret-file", default=None, help="call internal RPCs with the cluster secret")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("list", help="list the services")
    commands.add_parser("describe", help="show a service, method, message or enum").add_argument(
        "symbol"
    )
    commands.add_parser("health", help="grpc.health.v1 check").add_argument(
        "service", nargs="?", default="", help='service name ("" = whole server)'
    )
    generate = commands.add_parser("generate", help="stream a completion from the scheduler")
    generate.add_argument("prompt")
    generate.add_argument("--max-tokens", type=int, default=64)
    generate.add_argument("--raw", action="store_true", help="send a plain-text prompt, not a chat message")
    commands.add_parser("status", help="the scheduler's cluster status")
    call = commands.add_parser("call", help="call any unary or server-streaming method")
    call.add_argument("method", help="pkg.Service/Method")
    call.add_argument("json", nargs="?", default="{}", help="request as JSON")
    return parser


def request_of(args: argparse.Namespace) -> tuple[str, dict[str, Any] | str] | None:
    """(method, request) a calling command sends; None for `list` and `describe`."""
    if args.command == "health":
        return HEALTH_CHECK, {"service": args.service}
    if args.command == "generate":
        prompt = {"prompt": args.prompt} if args.raw else {"messages": [{"role": "user", "content": args.prompt}]}
        return f"{args.scheduler_service}/Generate", {**prompt, "max_tokens": args.max_tokens}
    if args.command == "status":
        return f"{args.scheduler_service}/GetClusterStatus", {}
    if args.command == "call":
        return args.method, args.json
    return None


# grpcurl


def metadata_of(args: argparse.Namespace) -> list[tuple[str, str]]:
    """Call metadata: the API key and the cluster secret, when given."""
    metadata = [("authorization", f"Bearer {args.api_key}")] if args.api_key else []
    if args.cluster_secret_file:
        with open(args.cluster_secret_file) as f:
            metadata.append((CLUSTER_SECRET_KEY, f.read().strip()))
    return metadata


def grpcurl_argv(grpcurl: str, args: argparse.Namespace) -> list[str]:
    """The grpcurl command line equivalent to `args`."""
    argv = [grpcurl, "-cacert", args.tls_ca] if args.tls_ca else [grpcurl, "-plaintext"]
    for key, value in metadata_of(args):
        argv += ["-H", f"{key}: {value}"]
    if args.timeout is not None:
        argv += ["-max-time", str(args.timeout)]
    if args.command == "list":
        return argv + [args.addr, "list"]
    if args.command == "describe":
        return argv + [args.addr, "describe", args.symbol]
    method, request = request_of(args)
    data = request if isinstance(request, str) else json.dumps(request)
    return argv + ["-d", data, args.addr, method]


def run_grpcurl(grpcurl: str, args: argparse.Namespace) -> int:
    """Hand the command to grpcurl; its exit status is ours."""
    return subprocess.run(grpcurl_argv(grpcurl, args)).returncode


# built-in (reflection client)


def run_builtin(args: argparse.Namespace) -> int:
    """Run the command with pdmesh's reflection client; errors go to stderr."""
    channel = None
    if args.tls_ca:
        with open(args.tls_ca, "rb") as f:
            channel = grpc.secure_channel(args.addr, grpc.ssl_channel_credentials(f.read()))
    with ReflectionClient(args.addr, channel, metadata=metadata_of(args)) as client:
        try:
            return COMMANDS[args.command](client, args)
        except grpc.RpcError as exc:
            details = rich_details(exc)
            print(f"ERROR: {details.pop('code')}: {details.pop('message')}", file=sys.stderr)
            if details:
                print(json.dumps(details, indent=2), file=sys.stderr)
            return 1
        except PdmeshError as exc:
            print(f"ERROR: {exc}", file=sys.stderr)
            return 1


def cmd_list(client: ReflectionClient, args: argparse.Namespace) -> int:
    """Print one service name a line."""
    for name in client.list_services():
        print(name)
    return 0


def cmd_describe(client: ReflectionClient, args: argparse.Namespace) -> int:
    """Print the symbol's definition."""
    print(client.describe(args.symbol))
    return 0


def cmd_health(client: ReflectionClient, args: argparse.Namespace) -> int:
    """Print the serving status; exit 0 only when SERVING."""
    status = client.health(args.service, timeout_s=args.timeout)
    print(status)
    return 0 if status == "SERVING" else 1


def cmd_generate(client: ReflectionClient, args: argparse.Namespace) -> int:
    """Print text deltas as they stream in; the finish reason and usage go to stderr."""
    method, request = request_of(args)
    last: dict[str, Any] = {}
    for chunk in client.call(method, request, timeout_s=args.timeout):
        print(chunk.get("text", ""), end="", flush=True)
        last = chunk
    print()
    summary = {key: last[key] for key in ("finish_reason", "usage") if key in last}
    if summary:
        print(json.dumps(summary), file=sys.stderr)
    return 0


def cmd_call(client: ReflectionClient, args: argparse.Namespace) -> int:
    """Print every response as indented JSON (used by `status` and `call`)."""
    method, request = request_of(args)
    for response in client.call(method, request, timeout_s=args.timeout):
        print(json.dumps(response, indent=2), flush=True)
    return 0


COMMANDS: dict[str, Callable[[ReflectionClient, argparse.Namespace], int]] = {
    "list": cmd_list,
    "describe": cmd_describe,
    "health": cmd_health,
    "generate": cmd_generate,
    "status": cmd_call,
    "call": cmd_call,
}


def main(argv: list[str] | None = None) -> int:
    """Parse `argv` (default sys.argv[1:]), run the command, return the exit status."""
    args = build_parser().parse_args(argv)
    grpcurl = None if args.builtin else shutil.which("grpcurl")
    if grpcurl:
        return run_grpcurl(grpcurl, args)
    return run_builtin(args)


if __name__ == "__main__":
    sys.exit(main())
