"""Shuffled, resumable token batches streamed from a layer's Zarr store.

A layer can be far larger than RAM (paper world: ~30M tokens x 8 KiB per layer), so the
stream never loads it whole. The train rows of the wanted modalities are cut into blocks
(the store's read unit); each epoch visits the blocks in a seeded random order, loads
``buffer_tokens`` worth of them, shuffles the rows inside that buffer and cuts batches.
A buffer's tail shorter than a batch is dropped (it lands in another buffer next epoch).

The whole schedule is a pure function of (seed, block sizes), so the position of step ``s``
is computed without reading any data: resuming after a kill is exact.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from stagediff.cache import ActivationStore


@dataclass(frozen=True)
class Block:
    modality: str
    start: int
    stop: int


def split_blocks(store: ActivationStore, modalities: tuple[str, ...], split: str) -> list[Block]:
    """One split's rows of ``modalities`` in blocks of the store's read unit (its Zarr chunk)."""
    out = []
    for m in modalities:
        lo, hi = store.split_rows(m, split)
        rows = store.array(m).chunks[0]
        out += [Block(m, s, min(s + rows, hi)) for s in range(lo, hi, rows)]
    if not out:
        raise RuntimeError(f"{store.path}: no {'/'.join(modalities)} tokens in split {split!r}")
    return out


def read_blocks(store: ActivationStore, blocks: list[Block]) -> torch.Tensor:
    return torch.cat([store.acts(b.modality, b.start, b.stop) for b in blocks])


class TokenStream:
    def __init__(self, store: ActivationStore, modalities: tuple[str, ...], batch_size: int,
                 buffer_tokens: int, seed: tuple[int, ...], split: str = "train"):
        self.store, self.batch_size = store, batch_size
        self.blocks = split_blocks(store, modalities, split)
        block_rows = store.array(modalities[0]).chunks[0]
        self.n_tokens = sum(b.stop - b.start for b in self.blocks)
        self.blocks_per_buffer = max(1, math.ceil(buffer_tokens / block_rows))
        if min(buffer_tokens, self.n_tokens) < batch_size:
            raise ValueError(f"batch_size {batch_size} exceeds the shuffle buffer "
                             f"({min(buffer_tokens, self.n_tokens)} tokens)")
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

    def batches(self, start_step: int = 0) -> Iterator[torch.Tensor]:
        """Endless batches [batch_size, d_model] (float32), from ``start_step`` on."""
        epoch, b0, skip = self.position(start_step)
        while True:
            for b, blocks in enumerate(self._buffers(epoch)):
                if b < b0:
                    continue
                x = read_blocks(self.store, blocks)
                perm = torch.from_numpy(self._rng(epoch, b).permutation(len(x)))
                for i in range(skip, len(x) // self.batch_size):  # gather per batch: no 2nd buffer copy
                    yield x[perm[i * self.batch_size : (i + 1) * self.batch_size]]
                skip = 0
            epoch, b0 = epoch + 1, 0
