"""Stores and process groups bound to one interface: the pieces of every pairwise and
tensor-parallel group, with no global world.

A TCPStore master listens on every interface unless handed a socket, so `serve_store` binds the
socket itself, to the host peers are told to dial. Gloo's transport binds the address of `host`
too (its default resolves this machine's host name, which on a host with several interfaces or in
a container may be the wrong one, or none at all).
"""

from __future__ import annotations

import datetime
import socket

import torch
import torch.distributed as dist


def serve_store(host: str, world_size: int, timeout_s: float) -> dist.TCPStore:
    """A TCPStore master on a free port of `host` only."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.bind((host, 0))
        sock.listen(128)
        port = sock.getsockname()[1]
    except OSError:
        sock.close()
        raise
    return dist.TCPStore(host, port, world_size, is_master=True, timeout=seconds(timeout_s),
                         wait_for_workers=False, master_listen_fd=sock.detach())


def connect_store(host: str, port: int, world_size: int, timeout_s: float) -> dist.TCPStore:
    return dist.TCPStore(host, port, world_size, is_master=False, timeout=seconds(timeout_s))


def gloo_group(store: dist.Store, rank: int, size: int, timeout_s: float, host: str) -> dist.ProcessGroupGloo:
    """A Gloo group whose transport binds `host` (this rank's own reachable address)."""
    options = dist.ProcessGroupGloo._Options()
    options._devices = [dist.ProcessGroupGloo.create_device(hostname=host)]
    options._timeout = seconds(timeout_s)
    return dist.ProcessGroupGloo(store, rank, size, options)


def nccl_group(store: dist.Store, rank: int, size: int, timeout_s: float,
               device: torch.device) -> dist.ProcessGroupNCCL:
    """An NCCL group for tensors on `device` (one GPU per rank; NCCL refuses two ranks on one GPU).
    Its communicator is made at the first operation, on `device`."""
    options = dist.ProcessGroupNCCL.Options()
    options._timeout = seconds(timeout_s)
    torch.cuda.set_device(device)
    return dist.ProcessGroupNCCL(store, rank, size, options)


def seconds(value: float) -> datetime.timedelta:
    return datetime.timedelta(seconds=value)
