"""Shuffled, resumable token batches streamed from a layer's Zarr store.

A layer can be far larger than RAM (paper world: ~30M tokens x 8 KiB per layer), so the
stream never loads it whole. The train rows of the wanted modalities are cut into blocks
(``read_chunks`` consecutive Zarr chunks: one contiguous read); each epoch visits the blocks in a
seeded random order, fills a shuffle buffer of ``buffer_tokens`` worth of them, shuffles the rows
inside that buffer and cuts batches. A buffer's tail shorter than a batch is dropped (it lands
in another buffer next epoch).

The whole schedule is a pure function of (seed, block sizes), so the position of step ``s``
is computed without reading any data: resuming after a kill is exact.

Memory and overlap: two buffers are allocated once, in the storage dtype (bf16: 2 bytes a value),
on the training device when they fit there; a batch is widened to float32 when it is cut. While
one buffer is being trained on, the next one's blocks are read into the other by ``read_ahead``
threads (Zarr reads release the GIL), each straight into its place (through pinned host rows for
a GPU buffer), so the trainer waits only when the disk is slower than it. Each filled buffer is
checked finite before a batch is cut from it; a NaN or Inf stops the stream naming the store and
the rows. A split that fits in one buffer (the text regime at paper scale: ~1M tokens, 30 epochs)
is read once and kept: each epoch's batches are gathered from that copy, the same rows as if the
buffer were read again.
"""
from __future__ import annotations

import itertools
import logging
import math
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from stagediff.cache import ActivationStore, StoreParts, first_nonfinite_row

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Block:
    modality: str
    start: int
    stop: int


def split_blocks(store: ActivationStore, modalities: tuple[str, ...], split: str,
                 read_chunks: int = 1) -> list[Block]:
    """One split's rows of ``modalities`` in blocks of ``read_chunks`` of the store's chunks."""
    out = []
    for m in modalities:
        lo, hi = store.split_rows(m, split)
        rows = store.chunk_rows(m) * read_chunks
        out += [Block(m, s, min(s + rows, hi)) for s in range(lo, hi, rows)]
    if not out:
        raise RuntimeError(f"{store.path}: no {'/'.join(modalities)} tokens in split {split!r}")
    return out


def read_blocks(store: ActivationStore, blocks: list[Block], device: torch.device | str = "cpu") -> torch.Tensor:
    return torch.cat([store.acts(b.modality, b.start, b.stop, device) for b in blocks])


def buffer_device(nbytes: int, device: torch.device) -> torch.device:
    """The training device if the buffers take at most half its free memory, else the host."""
    if device.type == "cuda" and nbytes > torch.cuda.mem_get_info(device)[0] // 2:
        log.warning("shuffle buffers (%.1f GB) do not fit beside the SAE on %s: kept in host memory",
                    nbytes / 1e9, device)
        return torch.device("cpu")
    return device


class TokenStream:
    def __init__(self, store: ActivationStore | StoreParts, modalities: tuple[str, ...], batch_size: int,
                 buffer_tokens: int, seed: tuple[int, ...], split: str = "train",
                 device: torch.device | str = "cpu", read_chunks: int = 1, read_ahead: int = 4):
        self.store, self.batch_size, self.device = store, batch_size, torch.device(device)
        self.read_ahead, self.modalities = read_ahead, tuple(modalities)
        self.blocks = split_blocks(store, modalities, split, read_chunks)
        block_rows = store.chunk_rows(modalities[0]) * read_chunks
        self.n_tokens = sum(b.stop - b.start for b in self.blocks)
        self.blocks_per_buffer = max(1, math.ceil(buffer_tokens / block_rows))
        self.buffer_rows = min(self.n_tokens, self.blocks_per_buffer * block_rows)
        if min(buffer_tokens, self.n_tokens) < batch_size:
            raise ValueError(f"sae_finetune.batch_size {batch_size} exceeds the shuffle buffer: "
                             f"{min(buffer_tokens, self.n_tokens)} tokens (sae_finetune.buffer_tokens, or the "
                             f"{'/'.join(modalities)} train tokens of {store.path})")
        self.seed = tuple(seed)

    def _rng(self, *key: int) -> np.random.Generator:
        return np.random.default_rng([*self.seed, *key])

    def _buffers(self, epoch: int) -> list[list[Block]]:
        order = self._rng(epoch).permutation(len(self.blocks))
        k = self.blocks_per_buffer
        return [[self.blocks[i] for i in order[j : j + k]] for j in range(0, len(order), k)]

    def position(self, step: int) -> tuple[int, int, int]:
        """(epoch, buffer, batch within buffer) of training step ``step``."""
        epoch = 0
        while True:
            for b, blocks in enumerate(self._buffers(epoch)):
                n = sum(x.stop - x.start for x in blocks) // self.batch_size
                if step < n:
                    return epoch, b, step
                step -= n
            epoch += 1

    def describe(self, step: int) -> str:
        """Where step ``step``'s batch comes from: its epoch, buffer, batch and the buffer's rows."""
        epoch, b, i = self.position(step)
        blocks = self._buffers(epoch)[b]
        rows = ", ".join(f"{x.modality}[{x.start}:{x.stop}]" for x in blocks[:4])
        more = f" and {len(blocks) - 4} more blocks" if len(blocks) > 4 else ""
        return f"epoch {epoch}, buffer {b}, batch {i}; the buffer holds train rows {rows}{more} of {self.store.path}"

    def _schedule(self, epoch: int, b0: int) -> Iterator[tuple[int, int, list[Block]]]:
        while True:
            for b, blocks in enumerate(self._buffers(epoch)):
                if b >= b0:
                    yield epoch, b, blocks
            epoch, b0 = epoch + 1, 0

    def batches(self, start_step: int = 0, labelled: bool = False) -> Iterator:
        """Endless batches [batch_size, d_model] (float32, on the stream's device), from ``start_step`` on.
        ``labelled``: (batch, {modality: the batch's row indices of that modality, on the device})
        instead, so that SAEs of several regimes can train on one read (each on its modalities' rows);
        the labels come from the host-side schedule, so selecting rows never waits for the device."""
        epoch, b0, skip = self.position(start_step)
        probe = self.store.stored(self.blocks[0].modality, self.blocks[0].start, self.blocks[0].start + 1)
        shape, dtype = (self.buffer_rows, probe.shape[1]), probe.dtype
        # the whole split in one buffer (e.g. the text regime: ~1M tokens at paper scale): read once
        # and reused every epoch; else two, the next one filling while batches are cut from the other
        resident = self.blocks_per_buffer >= len(self.blocks)
        n_bufs = 1 if resident else 2
        where = buffer_device(n_bufs * self.buffer_rows * probe.shape[1] * probe.element_size(), self.device)
        bufs = [torch.empty(shape, dtype=dtype, device=where) for _ in range(n_bufs)]
        staging = threading.local()  # per reader thread: pinned host rows for a device buffer

        def read(block: Block, buf: torch.Tensor, at: int) -> None:
            rows = block.stop - block.start
            if buf.device.type == "cpu":
                self.store.read_into(block.modality, block.start, buf[at : at + rows])
                return
            if getattr(staging, "rows", None) is None or len(staging.rows) < rows:
                staging.rows = torch.empty((rows, shape[1]), dtype=dtype, pin_memory=True)
            self.store.read_into(block.modality, block.start, staging.rows[:rows])
            buf[at : at + rows].copy_(staging.rows[:rows])

        def codes(blocks: list[Block]) -> np.ndarray:  # each buffer row's modality (its index in modalities)
            return np.repeat([self.modalities.index(x.modality) for x in blocks], [x.stop - x.start for x in blocks])

        def cut(buf: torch.Tensor, rows: np.ndarray, skip: int, code: np.ndarray) -> Iterator:
            on_buf = torch.from_numpy(rows).to(buf.device)
            for i in range(skip, len(rows) // self.batch_size):  # gather per batch: no 2nd buffer copy
                part = slice(i * self.batch_size, (i + 1) * self.batch_size)
                x = buf[on_buf[part]].to(self.device).float()
                if not labelled:
                    yield x
                    continue
                c = code[rows[part]]
                yield x, {m: torch.from_numpy(np.flatnonzero(c == j)).to(self.device)
                          for j, m in enumerate(self.modalities)}

        with ThreadPoolExecutor(self.read_ahead, thread_name_prefix="stream") as pool:
            def fill(buf: torch.Tensor, blocks: list[Block]):  # all of a buffer's blocks in flight at once
                offsets = np.cumsum([0] + [x.stop - x.start for x in blocks])
                return offsets, [pool.submit(read, x, buf, int(o)) for x, o in zip(blocks, offsets)]

            def check(buf: torch.Tensor, blocks: list[Block], offsets) -> None:
                # finite? once per buffer, where it lives (on a GPU: on the GPU), not per read: on the
                # CPU the reads' own checks cost the stream 16 % (bench_stream.py)
                if first_nonfinite_row(buf[: int(offsets[-1])]) is not None:
                    for x, o in zip(blocks, offsets):
                        self.store.check_finite(buf[int(o) : int(o) + x.stop - x.start], x.modality, x.start)

            if resident:  # each epoch's batches: the rows its buffer would hold, gathered from the one copy
                offsets, reads = fill(bufs[0], self.blocks)
                for r in reads:
                    r.result()
                check(bufs[0], self.blocks, offsets)
                at, code = {x: int(o) for x, o in zip(self.blocks, offsets)}, codes(self.blocks)
                for epoch in itertools.count(epoch):
                    (blocks,) = self._buffers(epoch)
                    rows = np.concatenate([np.arange(at[x], at[x] + x.stop - x.start) for x in blocks])
                    yield from cut(bufs[0], rows[self._rng(epoch, 0).permutation(len(rows))], skip, code)
                    skip = 0

            schedule = self._schedule(epoch, b0)  # (not resident: the loop above is endless)

            def fill_next(buf: torch.Tensor):  # the next scheduled buffer's reads, into ``buf``
                epoch, b, blocks = next(schedule)
                return epoch, b, blocks, *fill(buf, blocks)

            pending = fill_next(bufs[0])
            for turn in itertools.count():
                epoch, b, blocks, offsets, reads = pending
                for r in reads:
                    r.result()
                buf = bufs[turn % 2]
                pending = fill_next(bufs[(turn + 1) % 2])  # overlaps this buffer's training
                check(buf, blocks, offsets)
                yield from cut(buf, self._rng(epoch, b).permutation(int(offsets[-1])), skip, codes(blocks))
                skip = 0
