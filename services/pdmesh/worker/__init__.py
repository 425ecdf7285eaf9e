"""What prefill and decode workers share: engine start-up, registration, protobuf conversion."""
