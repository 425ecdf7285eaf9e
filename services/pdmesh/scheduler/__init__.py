"""The scheduler: client API, caps, admission, routing, streaming."""
