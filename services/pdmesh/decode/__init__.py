"""The decode worker: runs streams in its paged KV pool, batched."""
