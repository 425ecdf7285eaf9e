"""Render protobuf descriptors as .proto-like text (what `grpcurl describe` prints).

Works from the descriptor's `*DescriptorProto` form, which is what server reflection carries, so the
output is the same whether the descriptor came from generated code or from a reflection pool.
Comments are not shown: reflection servers written in Python do not send source info.
"""

from __future__ import annotations

from typing import Any

from google.protobuf import descriptor, descriptor_pb2

FieldProto = descriptor_pb2.FieldDescriptorProto
INDENT = "  "


def describe(desc: Any) -> str:
    """`<full name> is a <kind>:` followed by the .proto-like definition of a service, method,
    message or enum descriptor."""
    if isinstance(desc, descriptor.ServiceDescriptor):
        kind, lines = "service", service_lines(_to_proto(desc, descriptor_pb2.ServiceDescriptorProto))
    elif isinstance(desc, descriptor.MethodDescriptor):
        kind, lines = "method", [method_line(_to_proto(desc, descriptor_pb2.MethodDescriptorProto))]
    elif isinstance(desc, descriptor.Descriptor):
        kind, lines = "message", message_lines(_to_proto(desc, descriptor_pb2.DescriptorProto))
    elif isinstance(desc, descriptor.EnumDescriptor):
        kind, lines = "enum", enum_lines(_to_proto(desc, descriptor_pb2.EnumDescriptorProto))
    else:
        raise TypeError(f"cannot describe a {type(desc).__name__}")
    return "\n".join([f"{desc.full_name} is a {kind}:", *lines])


def _to_proto(desc: Any, proto_cls: type) -> Any:
    proto = proto_cls()
    desc.CopyToProto(proto)
    return proto


def service_lines(service: descriptor_pb2.ServiceDescriptorProto) -> list[str]:
    """`service Name { rpc ...; }` as lines."""
    rpcs = [INDENT + method_line(method) for method in service.method]
    return [f"service {service.name} {{", *rpcs, "}"]


def method_line(method: descriptor_pb2.MethodDescriptorProto) -> str:
    """`rpc Name(Request) returns (stream Response);`"""
    request = ("stream " if method.client_streaming else "") + _type_name(method.input_type)
    response = ("stream " if method.server_streaming else "") + _type_name(method.output_type)
    return f"rpc {method.name}({request}) returns ({response});"


def message_lines(message: descriptor_pb2.DescriptorProto) -> list[str]:
    """`message Name { fields, oneofs, nested messages and enums }` as lines."""
    map_entries = {nested.name: nested for nested in message.nested_type if nested.options.map_entry}
    body: list[str] = []
    oneof_fields: dict[int, list[str]] = {}
    for field in message.field:
        line = field_line(field, map_entries)
        if field.HasField("oneof_index") and not field.proto3_optional:
            oneof_fields.setdefault(field.oneof_index, []).append(line)
        else:
            body.append(line)
    for index, lines in oneof_fields.items():
        body += [f"oneof {message.oneof_decl[index].name} {{", *_indent(lines), "}"]
    for nested in message.nested_type:
        if not nested.options.map_entry:
            body += message_lines(nested)
    for enum in message.enum_type:
        body += enum_lines(enum)
    return [f"message {message.name} {{", *_indent(body), "}"]


def field_line(field: FieldProto, map_entries: dict[str, descriptor_pb2.DescriptorProto]) -> str:
    """One field: `repeated string stop = 7;`, `map<string, int32> labels = 9;`..."""
    entry = map_entries.get(field.type_name.rsplit(".", 1)[-1]) if field.type_name else None
    if entry is not None and field.label == FieldProto.LABEL_REPEATED:
        key, value = (_field_type(f) for f in entry.field)
        return f"map<{key}, {value}> {field.name} = {field.number};"
    return f"{_label(field)}{_field_type(field)} {field.name} = {field.number};"


def enum_lines(enum: descriptor_pb2.EnumDescriptorProto) -> list[str]:
    """`enum Name { VALUE = n; }` as lines."""
    values = [f"{value.name} = {value.number};" for value in enum.value]
    return [f"enum {enum.name} {{", *_indent(values), "}"]


def _label(field: FieldProto) -> str:
    if field.label == FieldProto.LABEL_REPEATED:
        return "repeated "
    if field.label == FieldProto.LABEL_REQUIRED:
        return "required "
    return "optional " if field.proto3_optional else ""


def _field_type(field: FieldProto) -> str:
    if field.type_name:
        return _type_name(field.type_name)
    return FieldProto.Type.Name(field.type).removeprefix("TYPE_").lower()


def _type_name(name: str) -> str:
    return name.lstrip(".")


def _indent(lines: list[str]) -> list[str]:
    return [INDENT + line for line in lines]
