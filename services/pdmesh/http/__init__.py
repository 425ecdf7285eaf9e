"""The scheduler's OpenAI-compatible HTTP API, served beside gRPC on the same event loop.

Requests go through the same `FrontDoor` as gRPC `Generate` (tenants, caps, admission, metrics);
this package only converts OpenAI JSON to `GenerateRequest` and deltas back to OpenAI JSON or SSE.
"""
