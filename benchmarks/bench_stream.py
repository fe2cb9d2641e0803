"""The SAE data stream vs the disk, and SAE training fed by it vs from memory (issue [I]).

One run, side by side, alternating, on one layer store written by the cache's own writer:

1. read rate: ``TokenStream`` over one epoch (shuffled multi-chunk reads in flight, copied into the
   preallocated bf16 buffer, batches cut and widened to float32) vs a plain sequential read of the
   same store's activation files (``readinto`` of every shard file, front to back);
2. training: stagediff's TopK SAE steps fed by the stream vs the same number of steps on batches
   already in memory (the same shapes; the step is forward, loss, backward, Adam).

Before each timed read the store's files are evicted from the page cache (``posix_fadvise``
DONTNEED), so both sides read the disk, not RAM; ``--warm`` keeps them cached.

    python benchmarks/bench_stream.py                        # d_model 1024, 256k tokens (512 MiB)
    python benchmarks/bench_stream.py --device cuda --d-model 4096 --d-sae 32768 --k 50 --tokens 4000000
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from stagediff.cache import ActivationStore, LayerStoreWriter
from stagediff.data.items import SPLIT_CODES
from stagediff.sae.stream import TokenStream
from stagediff.sae.topk import TopKSAE


def make_store(path: Path, n: int, d: int, chunk_rows: int, chunks_per_shard: int) -> ActivationStore:
    """``n`` train image tokens of random bf16 rows, through the cache's writer (its real layout)."""
    w = LayerStoreWriter({0: path}, d, {"dtype": "bfloat16", "chunk_rows": chunk_rows,
                                        "chunks_per_shard": chunks_per_shard},
                         {"dtype": "bfloat16", "model": "bench", "config_hash": "bench"})
    g = torch.Generator().manual_seed(0)
    step = chunk_rows * chunks_per_shard
    for lo in range(0, n, step):
        m = min(step, n - lo)
        rows = torch.randn(m, d, generator=g).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
        meta = {"sample_id": np.arange(lo, lo + m), "position": np.zeros(m), "token_id": np.zeros(m),
                "split": np.full(m, SPLIT_CODES["train"])}
        w.add("image", {0: rows}, meta)
    for name in ("text",):  # an empty text span, as a store always has both
        w.add(name, {0: np.zeros((0, d), np.uint16)}, {k: np.zeros(0) for k in ("sample_id", "position",
                                                                                  "token_id", "split")})
    w.close({})
    return ActivationStore(path)


def evict(files: list[Path]) -> None:
    """Drop the files' clean pages from the page cache: the next read comes from the disk."""
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def raw_read(files: list[Path]) -> float:
    """Seconds to read every file front to back into one reused buffer."""
    buf = bytearray(max(f.stat().st_size for f in files))
    t = time.perf_counter()
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            view = memoryview(buf)
            while fh.readinto(view):
                pass
    return time.perf_counter() - t


def stream_epoch(stream: TokenStream, steps: int, device: torch.device) -> float:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    t = time.perf_counter()
    it = stream.batches(0)
    for _ in range(steps):
        next(it)
    sync()
    it.close()
    return time.perf_counter() - t


def train(batches, steps: int, d: int, d_sae: int, k: int, device: torch.device) -> float:
    sae = TopKSAE.random_init(d, d_sae, k, generator=torch.Generator().manual_seed(0)).to(device)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-4, fused=True)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    x = next(batches)
    sae.normalised_mse(x).backward()  # warm-up
    sync()
    t = time.perf_counter()
    for _ in range(steps):
        x = next(batches)
        loss = sae.normalised_mse(x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    sync()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--d-model", type=int, default=1024)
    ap.add_argument("--d-sae", type=int, default=8192)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=262_144)
    ap.add_argument("--batch-size", type=int, default=4096)
    ap.add_argument("--buffer-tokens", type=int, default=65_536)
    ap.add_argument("--chunk-rows", type=int, default=4096)
    ap.add_argument("--chunks-per-shard", type=int, default=16)
    ap.add_argument("--read-chunks", type=int, default=8)
    ap.add_argument("--read-ahead", type=int, default=4)
    ap.add_argument("--train-steps", type=int, default=12)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--warm", action="store_true", help="read from the page cache (no eviction)")
    ap.add_argument("--dir", default=None, help="where the store goes (the node's disk; default: a temp dir)")
    a = ap.parse_args()
    device = torch.device(a.device)
    with tempfile.TemporaryDirectory(dir=a.dir) as tmp:
        store = make_store(Path(tmp) / "L0.zarr", a.tokens, a.d_model, a.chunk_rows, a.chunks_per_shard)
        files = sorted(f for f in (Path(tmp) / "L0.zarr" / "image" / "acts").rglob("*")
                       if f.is_file() and f.name != "zarr.json")
        nbytes = sum(f.stat().st_size for f in files)

        def stream():
            return TokenStream(store, ("image",), a.batch_size, a.buffer_tokens, (0,), device=device,
                               read_chunks=a.read_chunks, read_ahead=a.read_ahead)

        epoch_steps = sum((sum(b.stop - b.start for b in buf)) // a.batch_size for buf in stream()._buffers(0))
        epoch_bytes = epoch_steps * a.batch_size * a.d_model * 2
        raw, streamed = [], []
        cold = (lambda: None) if a.warm else (lambda: evict(files))
        for _ in range(a.repeats):
            cold()
            raw.append(nbytes / raw_read(files))
            cold()
            streamed.append(epoch_bytes / stream_epoch(stream(), epoch_steps, device))
        print(f"{'page cache (--warm)' if a.warm else 'disk (files evicted before each read)'}; "
              f"store: {a.tokens:,} tokens x d_model {a.d_model} bf16 = {nbytes / 2**20:.0f} MiB in {len(files)} "
              f"shard files; chunk {a.chunk_rows} rows, read {a.read_chunks} chunks, {a.read_ahead} in flight, "
              f"buffer {a.buffer_tokens:,} tokens, batch {a.batch_size}, {device}, {torch.get_num_threads()} threads")
        print(f"  raw sequential read   {statistics.median(raw) / 1e9:6.2f} GB/s  (runs: "
              f"{', '.join(f'{r / 1e9:.2f}' for r in raw)})")
        print(f"  TokenStream, 1 epoch  {statistics.median(streamed) / 1e9:6.2f} GB/s  (runs: "
              f"{', '.join(f'{r / 1e9:.2f}' for r in streamed)})")
        print(f"ratio stream / raw read = {statistics.median(streamed) / statistics.median(raw):.2f}  (goal >= 0.7)")

        # the same number of steps; in memory: batches already on the device, cycled
        mem = torch.randn(4 * a.batch_size, a.d_model, device=device).split(a.batch_size)

        def cycled():
            while True:
                yield from mem

        fed, held = [], []
        for _ in range(a.repeats):
            held.append(a.train_steps * a.batch_size / train(cycled(), a.train_steps, a.d_model, a.d_sae, a.k, device))
            cold()
            it = stream().batches(0)
            fed.append(a.train_steps * a.batch_size / train(it, a.train_steps, a.d_model, a.d_sae, a.k, device))
            it.close()
        print(f"SAE training, d_sae {a.d_sae}, k {a.k}, {a.train_steps} steps x {a.repeats} repeats:")
        print(f"  from memory        {statistics.median(held):10,.0f} tokens/s  (runs: "
              f"{', '.join(f'{r:,.0f}' for r in held)})")
        print(f"  fed by the stream  {statistics.median(fed):10,.0f} tokens/s  (runs: "
              f"{', '.join(f'{r:,.0f}' for r in fed)})")
        print(f"ratio stream-fed / in-memory = {statistics.median(fed) / statistics.median(held):.2f}  (goal >= 0.9)")


if __name__ == "__main__":
    main()
