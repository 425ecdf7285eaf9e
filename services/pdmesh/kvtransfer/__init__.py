"""Moving KV caches between workers over pairwise torch.distributed groups."""
