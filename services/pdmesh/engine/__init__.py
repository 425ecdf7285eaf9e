"""A paged-KV PyTorch engine for Llama-family models."""
