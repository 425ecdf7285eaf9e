"""Protobuf and gRPC code generated from protos/ by tools/gen_protos.py; do not edit.

Modules mirror the proto paths under this package: protos/pdmesh/v1/x.proto is
`pdmesh.gen.pdmesh.v1.x_pb2` (messages) and `x_pb2_grpc` (stubs, servicers). Their imports of
each other are rewritten to this package by the generator, so no sys.path change is needed.
"""
