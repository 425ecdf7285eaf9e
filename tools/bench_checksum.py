"""What the KV hand-off checksum costs: the hash alone, and a whole hand-off with and without it.

    python tools/bench_checksum.py [--tokens 1000] [--repeats 30]

The KV is a 1,000-token SmolLM2-135M prompt in float32 ([30 layers, 2, tokens, 3 KV heads, 64] =
46.1 MB). Part 1 times each candidate hash over it on one core. Part 2 runs the real channel
(kvtransfer/channel.py) between two processes on 127.0.0.1, as a hand-off does: the receiver posts
every layer's receive, the sender sends, and the hand-off ends when the receiver holds the KV and
the sender's answer (here through the pair's TCPStore, in the mesh the PullKV reply). Three ways,
interleaved so load on the machine hits all alike:
- none: no checksum (what the mesh did before);
- pipelined: what pdmesh does: the sender hashes in a second thread while its layers are on the
  wire, the receiver hashes each layer as it lands and compares at the end;
- after: the receiver hashes the whole tensor only once it is in (for comparison).
Cost = median over repeats of (hand-off with checksum - hand-off without), over the median
hand-off without; and, apart, the hashing left to do after the last byte has landed (what remains
on the critical path when the hashing during the transfer has a core to itself). Goal: <= 2%.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import sys
import time
import zlib
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "services"))
sys.path.insert(0, str(ROOT / "tools"))

from bench_common import format_table  # noqa: E402
from pdmesh.kvtransfer.channel import RECEIVER_RANK, SENDER_RANK, KVChannel, connect_store, serve_store  # noqa: E402
from pdmesh.kvtransfer.checksum import DEVICE_SUM, XXH3, KVChecksum, kv_checksum  # noqa: E402

LAYERS, KV_HEADS, HEAD_DIM = 30, 3, 64  # SmolLM2-135M
MODES = ("none", "pipelined", "after")
WARMUP = 3


def kv_of(tokens: int) -> torch.Tensor:
    torch.manual_seed(0)
    return torch.randn(LAYERS, 2, tokens, KV_HEADS, HEAD_DIM)


def hash_table(kv: torch.Tensor, repeats: int) -> list[list[object]]:
    raw = memoryview(kv.view(-1).view(torch.uint8).numpy())
    candidates = {
        "zlib.crc32 (stdlib)": lambda: zlib.crc32(raw),
        "xxh3_64 (pdmesh, CPU)": lambda: kv_checksum(kv, XXH3),
        "device_sum (pdmesh on GPU; here on CPU)": lambda: kv_checksum(kv, DEVICE_SUM),
    }
    rows = []
    for name, run in candidates.items():
        times = []
        for _ in range(max(5, repeats // 3)):
            start = time.perf_counter()
            run()
            times.append(time.perf_counter() - start)
        best, median = min(times), statistics.median(times)
        rows.append([name, median * 1e3, kv.numel() * 4 / best / 1e9])
    return rows


def sender(port: int, tokens: int, repeats: int) -> None:
    torch.set_num_threads(1)
    import threading

    store = connect_store("127.0.0.1", port, 60)
    channel = KVChannel(store, "bench", SENDER_RANK, 60, "127.0.0.1")
    kv = kv_of(tokens)
    for i in range(repeats + WARMUP):
        for mode in MODES:
            tag = i * len(MODES) + MODES.index(mode)
            store.wait([f"go{tag}"])
            if mode == "none":
                channel.send(kv, tag)
                digest = 0
            else:  # as kv_sender.py: hash in a second thread while the layers are on the wire
                result = {}
                hasher = threading.Thread(target=lambda: result.update(d=kv_checksum(kv)))
                hasher.start()
                channel.send(kv, tag)
                hasher.join()
                digest = result["d"]
            store.set(f"done{tag}", str(digest))


def receive(channel: KVChannel, store, tag: int, tokens: int, mode: str) -> tuple[float, float]:
    """(seconds of the hand-off, seconds of hashing after its last layer landed)."""
    shape = (LAYERS, 2, tokens, KV_HEADS, HEAD_DIM)
    checksum = KVChecksum(XXH3)
    tail = [0.0]

    def on_layer(layer: torch.Tensor) -> None:
        started = time.perf_counter()
        checksum.update(layer)
        tail[0] = time.perf_counter() - started  # the last layer's is what is left at the end

    start = time.perf_counter()
    store.set(f"go{tag}", "1")
    kv = channel.recv(shape, torch.float32, tag, on_layer if mode == "pipelined" else None)
    digest = int(store.get(f"done{tag}"))
    if mode == "after":
        started = time.perf_counter()
        digest_here = kv_checksum(kv)
        tail[0] = time.perf_counter() - started
    else:
        digest_here = checksum.digest() if mode == "pipelined" else 0
    seconds = time.perf_counter() - start
    assert digest == digest_here, (mode, digest, digest_here)
    return seconds, tail[0]


def handoff_table(tokens: int, repeats: int) -> tuple[list[list[object]], float]:
    torch.set_num_threads(1)
    store = serve_store("127.0.0.1", 60)
    child = mp.get_context("spawn").Process(target=sender, args=(store.port, tokens, repeats), daemon=True)
    child.start()
    try:
        channel = KVChannel(store, "bench", RECEIVER_RANK, 60, "127.0.0.1")
        times: dict[str, list[float]] = {m: [] for m in MODES}
        tails: dict[str, list[float]] = {m: [] for m in MODES}
        for i in range(repeats + WARMUP):
            for mode in MODES:
                seconds, tail = receive(channel, store, i * len(MODES) + MODES.index(mode), tokens, mode)
                if i >= WARMUP:
                    times[mode].append(seconds)
                    tails[mode].append(tail)
    finally:
        child.join(30)
        if child.is_alive():
            child.kill()
    base = statistics.median(times["none"])
    rows = []
    for mode in MODES:
        added = statistics.median(t - n for t, n in zip(times[mode], times["none"]))
        tail = statistics.median(tails[mode])
        rows.append([mode, statistics.median(times[mode]) * 1e3, added * 1e3,
                     f"{100 * added / base:.1f}%" if mode != "none" else "-", tail * 1e3,
                     f"{100 * tail / base:.2f}%" if mode != "none" else "-"])
    return rows, base


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    kv = kv_of(args.tokens)
    megabytes = kv.numel() * 4 / 1e6
    print(f"KV of a {args.tokens:,}-token SmolLM2 prompt: {megabytes:.1f} MB "
          f"([{LAYERS}, 2, {args.tokens}, {KV_HEADS}, {HEAD_DIM}] float32)\n")
    torch.set_num_threads(1)
    print(format_table(["hash over the whole KV, one core", "ms (median)", "GB/s (best)"],
                       hash_table(kv, args.repeats)))
    rows, base = handoff_table(args.tokens, args.repeats)
    print(f"\nhand-off over a Gloo pair on 127.0.0.1, {args.repeats} repeats "
          f"({megabytes / base / 1e3:.2f} GB/s without a checksum)\n")
    print(format_table(["checksum", "hand-off ms (median)", "added ms (median of pairs)", "cost",
                        "hashing after the last byte, ms", "of the hand-off"], rows))


if __name__ == "__main__":
    main()
