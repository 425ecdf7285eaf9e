"""A gRPC client built from server reflection alone, no generated stubs (what grpcurl does).

    with ReflectionClient("127.0.0.1:50051") as client:
        client.list_services()      # ["grpc.health.v1.Health", "pdmesh.v1.Scheduler", ...]
        print(client.describe("pdmesh.v1.Scheduler"))
        for chunk in client.call("pdmesh.v1.Scheduler/Generate", {"prompt": "Hi", "max_tokens": 8}):
            print(chunk["text"], end="")
        client.health()             # "SERVING"

Descriptors come from the server's reflection service into a private descriptor pool, request and
response classes are made from them, and messages cross as JSON-shaped dicts (json_format, proto
field names). A sync channel is enough for a debugging and testing tool.
"""

from __future__ import annotations

import json
from typing import Any, Iterator, Sequence

import grpc
from google.protobuf import descriptor, descriptor_pool, json_format, message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from pdmesh.errors import InvalidRequestError, NotFoundError
from pdmesh.rpc.proto_text import describe

Metadata = Sequence[tuple[str, str]]


class ReflectionClient:
    """Lists, describes and calls a server's services using only its reflection service."""

    def __init__(self, target: str, channel: grpc.Channel | None = None, metadata: Metadata = ()):
        """Connect to `target` ("host:port", plaintext) or use the given channel; `metadata` goes
        with every call (an API key, the cluster secret)."""
        self.target = target
        self.metadata = tuple(metadata)
        self._own_channel = channel is None
        self._channel = channel or grpc.insecure_channel(target)
        self._database = ProtoReflectionDescriptorDatabase(self._channel)
        self._pool = descriptor_pool.DescriptorPool(self._database)

    def close(self) -> None:
        """Close the channel if this client opened it."""
        if self._own_channel:
            self._channel.close()

    def __enter__(self) -> ReflectionClient:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def list_services(self) -> list[str]:
        """Full names of the services the server exposes, sorted."""
        return sorted(self._database.get_services())

    def find(self, symbol: str) -> Any:
        """The service, method, message or enum descriptor named `symbol`.

        Methods may be written `pkg.Service/Method` or `pkg.Service.Method`.
        """
        name = symbol.strip().lstrip(".").replace("/", ".")
        for find in (
            self._pool.FindServiceByName,
            self._pool.FindMessageTypeByName,
            self._pool.FindEnumTypeByName,
            self._find_method,
        ):
            try:
                return find(name)
            except KeyError:
                continue
        raise NotFoundError(f"symbol {symbol!r} is not known to the server at {self.target}")

    def _find_method(self, name: str) -> descriptor.MethodDescriptor:
        # The pool cannot fetch a method's file by the method's name; fetch its service's.
        service, _, method = name.rpartition(".")
        return self._pool.FindServiceByName(service).methods_by_name[method]

    def describe(self, symbol: str) -> str:
        """.proto-like text for a service, method, message or enum."""
        return describe(self.find(symbol))

    def method(self, name: str) -> descriptor.MethodDescriptor:
        """The method descriptor for `pkg.Service/Method` (or `pkg.Service.Method`)."""
        found = self.find(name)
        if not isinstance(found, descriptor.MethodDescriptor):
            raise NotFoundError(f"{name!r} is not a method (want pkg.Service/Method)")
        return found

    def call(
        self,
        method: str,
        request: dict[str, Any] | str = "{}",
        *,
        timeout_s: float | None = None,
        metadata: Metadata = (),
    ) -> Iterator[dict[str, Any]]:
        """Call a unary or server-streaming method; iterate its responses as dicts as they arrive.

        `request` is a dict or JSON text in protobuf's JSON mapping (proto or camelCase names).
        A unary call completes before this returns. Failed calls raise grpc.RpcError (decode it
        with pdmesh.rpc.errors.rich_details); a stream raises it while being iterated.
        """
        method_desc = self.method(method)
        if method_desc.client_streaming:
            raise InvalidRequestError(
                f"{method} is client-streaming; only unary and server-streaming calls work here",
                "method",
            )
        request_msg = self._parse(method_desc.input_type, request)
        rpc = self._callable(method_desc)
        responses = rpc(request_msg, timeout=timeout_s, metadata=(*self.metadata, *metadata))
        if not method_desc.server_streaming:
            responses = [responses]
        return (self.to_dict(response) for response in responses)

    def call_unary(
        self, method: str, request: dict[str, Any] | str = "{}", **kwargs: Any
    ) -> dict[str, Any]:
        """Call a unary method and return its one response as a dict."""
        (response,) = list(self.call(method, request, **kwargs))
        return response

    def health(self, service: str = "", timeout_s: float | None = 10.0) -> str:
        """grpc.health.v1 status of `service` ("" = the whole server): "SERVING", "NOT_SERVING"...

        An unknown service raises grpc.RpcError with code NOT_FOUND.
        """
        stub = health_pb2_grpc.HealthStub(self._channel)
        reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)

    def to_dict(self, message: Any) -> dict[str, Any]:
        """A response message as a JSON-shaped dict with proto field names."""
        return json_format.MessageToDict(
            message, preserving_proto_field_name=True, descriptor_pool=self._pool
        )

    def _callable(self, method_desc: descriptor.MethodDescriptor) -> Any:
        path = f"/{method_desc.containing_service.full_name}/{method_desc.name}"
        response_cls = message_factory.GetMessageClass(method_desc.output_type)
        channel = self._channel
        make = channel.unary_stream if method_desc.server_streaming else channel.unary_unary
        return make(
            path,
            request_serializer=lambda message: message.SerializeToString(),
            response_deserializer=response_cls.FromString,
        )

    def _parse(self, message_desc: descriptor.Descriptor, request: dict[str, Any] | str) -> Any:
        message = message_factory.GetMessageClass(message_desc)()
        try:
            fields = json.loads(request) if isinstance(request, str) else request
            return json_format.ParseDict(fields, message, descriptor_pool=self._pool)
        except (ValueError, json_format.ParseError) as exc:
            raise InvalidRequestError(f"bad {message_desc.full_name} JSON: {exc}", "request") from exc
