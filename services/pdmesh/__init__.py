"""pdmesh: LLM serving as a gRPC mesh with disaggregated prefill and decode."""

__version__ = "0.1.0"
