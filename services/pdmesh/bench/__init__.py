"""`pdmesh bench`: a load generator for pdmesh gRPC or any OpenAI-compatible HTTP server."""
