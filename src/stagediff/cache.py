"""Per-layer activation cache in Zarr v3 (paper §4.1).

Layout of ``L<layer>.zarr`` (one store per layer)::

    text/acts     [n_text, d_model]   residual activations (bf16 stored as a uint16 view by default)
    text/sample_id, text/position, text/token_id, text/split   one entry per cached token
    image/...     the same for image tokens
    COMPLETE      JSON marker, written last (a store without it is never read)

Rows are appended in whole shards (the Zarr v3 sharding codec), so a layer's store is a handful
of files and the single writer never rewrites a shard. Padding and BOS tokens are not cached:
padding carries no data and BOS is an out-of-distribution massive-norm token that every SAE
stage would have to drop anyway.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import time
from pathlib import Path

import google_crc32c
import numpy as np
import torch
import zarr
from zarr.core.group import GroupMetadata
from zarr.storage import LocalStore, MemoryStore

from stagediff.capture import capture_residuals
from stagediff.data.items import SPLIT_CODES, Item
from stagediff.io import atomic_dir
from stagediff.models.vlm import iter_batches, to_model, token_masks

log = logging.getLogger(__name__)
MODALITIES = ("text", "image")
# Token spans a stage may read, by config value (all = both modalities).
SPANS = {"text": ("text",), "image": ("image",), "all": MODALITIES}
MARKER = "COMPLETE"
_EMPTY = 2**64 - 1  # shard index entry of an absent chunk
META = {"sample_id": np.int64, "position": np.int32, "token_id": np.int32, "split": np.int8}


def config_hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def to_storage(x: torch.Tensor, dtype: str) -> np.ndarray:
    """bf16 has no Zarr dtype: store its bit pattern as uint16 (exact round trip)."""
    if dtype == "bfloat16":
        return x.to(torch.bfloat16).view(torch.int16).cpu().numpy().view(np.uint16)
    return x.to(getattr(torch, dtype)).cpu().numpy()


def from_storage(a: np.ndarray, dtype: str) -> torch.Tensor:
    if dtype == "bfloat16":
        return torch.from_numpy(np.ascontiguousarray(a).view(np.int16)).view(torch.bfloat16).float()
    return torch.from_numpy(np.ascontiguousarray(a)).float()


@functools.lru_cache  # immutable, and the same for every layer store of a job
def _column_metadata(width: int | None, dtype, chunk_rows: int, shard_rows: int):
    """Zarr v3 metadata of one column: empty, grown along axis 0 in whole shards, uncompressed
    (the layout ``_ShardedColumn`` writes: little-endian chunks, index at the end with a crc32c)."""
    shape, chunks, shards = (0,), (chunk_rows,), (shard_rows,)
    if width is not None:
        shape, chunks, shards = (0, width), (chunk_rows, width), (shard_rows, width)
    return zarr.create_array(MemoryStore(), shape=shape, dtype=dtype, chunks=chunks, shards=shards,
                             compressors=None, fill_value=0).metadata


class _ShardedColumn:
    """A 1-D or 2-D Zarr v3 array grown along axis 0 by whole shards, written without Zarr's append.

    Why: ``Array.append`` rewrites zarr.json on every call and copies each shard through three fresh
    buffers (chunk encode, shard concatenation, store write): 2-3x the cost of the write itself, and
    a metadata round trip per append on a cluster file system. An uncompressed shard is simply its
    inner chunks back to back, in row order, which is exactly a C-order block of rows, followed by
    an index of (offset, nbytes) per chunk and that index's crc32c. So one reused buffer is written
    as is, and the array's metadata is written once, with its final shape, by the store's ``close``.
    The bytes equal Zarr's own (tests/test_cache.py::test_shards_are_byte_identical_to_zarrs).
    """

    def __init__(self, metadata, root: Path):
        self.metadata, self.root = metadata, root
        self.chunk_rows = metadata.codecs[0].chunk_shape[0]
        dtype = metadata.data_type.to_native_dtype().newbyteorder("<")
        self.buf = np.zeros(metadata.chunk_grid.chunk_shape, dtype=dtype)  # one shard; rows are copied once, here
        self.n = 0  # rows waiting in buf
        self.rows = 0  # rows written to shard files
        self.shards = 0

    def add(self, rows: np.ndarray) -> None:
        i = 0
        while i < len(rows):
            take = min(len(self.buf) - self.n, len(rows) - i)
            self.buf[self.n : self.n + take] = rows[i : i + take]  # casts, e.g. int64 positions to int32
            self.n, i = self.n + take, i + take
            if self.n == len(self.buf):
                self._write_shard()

    def _write_shard(self) -> None:
        n_chunks = len(self.buf) // self.chunk_rows
        used = -(-self.n // self.chunk_rows)  # chunks holding rows; an edge chunk is stored whole,
        self.buf[self.n : used * self.chunk_rows] = 0  # its rows past the end as the fill value
        chunk_bytes = self.buf[: self.chunk_rows].nbytes
        index = np.full((n_chunks, 2), _EMPTY, dtype="<u8")  # chunks past the end: absent
        index[:used, 0] = np.arange(used) * chunk_bytes
        index[:used, 1] = chunk_bytes
        index = index.tobytes()
        path = self.root / self.metadata.encode_chunk_key((self.shards,) + (0,) * (self.buf.ndim - 1))
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as f:
            f.write(memoryview(self.buf[: used * self.chunk_rows]).cast("B"))
            f.write(index + np.uint32(google_crc32c.value(index)).astype("<u4").tobytes())
        self.rows, self.shards, self.n = self.rows + self.n, self.shards + 1, 0

    def close(self):
        """Write the last, partial shard; return the array's metadata with its final shape."""
        if self.n:
            self._write_shard()
        return self.metadata.update_shape((self.rows, *self.buf.shape[1:]))


class LayerStoreWriter:
    """One layer's store: shard files as rows arrive, every node's zarr.json at ``close``."""

    def __init__(self, path: Path, d_model: int, cfg: dict, attrs: dict):
        self.path, self.attrs = path, attrs
        chunk, shard = cfg["chunk_rows"], cfg["chunk_rows"] * cfg["chunks_per_shard"]
        storage = "uint16" if cfg["dtype"] == "bfloat16" else cfg["dtype"]
        columns = {"acts": _column_metadata(d_model, storage, chunk, shard)}
        columns.update({name: _column_metadata(None, dt, chunk, shard) for name, dt in META.items()})
        self.cols = {m: {name: _ShardedColumn(meta, path / m / name) for name, meta in columns.items()}
                     for m in MODALITIES}

    def add(self, modality: str, acts: np.ndarray, meta: dict[str, np.ndarray]) -> None:
        self.cols[modality]["acts"].add(acts)
        for name, col in meta.items():
            self.cols[modality][name].add(col)

    def close(self, summary: dict) -> None:
        nodes = {"": GroupMetadata(attributes=self.attrs)}
        for m, cols in self.cols.items():
            nodes[m] = GroupMetadata()
            nodes.update({f"{m}/{name}": col.close() for name, col in cols.items()})
        # one call writes every node's metadata concurrently, instead of a round trip per node
        dict(zarr.create_hierarchy(store=LocalStore(self.path), nodes=nodes))
        (self.path / MARKER).write_text(json.dumps(summary, sort_keys=True))


def cache_activations(model, processor, items: list[Item], layers: list[int], outputs: dict[int, Path],
                      cfg: dict, attrs: dict) -> None:
    """Run the model once per batch and write every owned layer's store (atomically)."""
    d_model = model.config.text_config.hidden_size
    with contextlib.ExitStack() as stack:  # all layer stores appear together, or none does
        tmps = {L: stack.enter_context(atomic_dir(p)) for L, p in outputs.items()}
        writers = {L: LayerStoreWriter(tmps[L], d_model, cfg, {**attrs, "layer": L}) for L in layers}
        counts = {m: 0 for m in MODALITIES}
        t0, done = time.time(), 0
        n_batches = (len(items) + cfg["batch_size"] - 1) // cfg["batch_size"]
        for bi, (part, b) in enumerate(iter_batches(processor, items, cfg["batch_size"])):
            for m, n in cache_batch(model, part, b, layers, writers, cfg["dtype"]).items():
                counts[m] += n
            done += len(part)
            if bi % max(1, n_batches // 10) == 0 or bi == n_batches - 1:
                dt = time.time() - t0
                log.info("cache: %d/%d samples, %.0f tokens/s, ETA %.0fs", done, len(items),
                         (counts["text"] + counts["image"]) / max(dt, 1e-9), dt / done * (len(items) - done))
        for L, w in writers.items():
            w.close({"n_text": counts["text"], "n_image": counts["image"], "n_samples": len(items)})


def cache_batch(model, part: list[Item], b: dict, layers: list[int], writers: dict, dtype: str) -> dict[str, int]:
    """One forward for one batch; append every owned layer's text and image rows."""
    image_mask, text_mask = token_masks(b, model)
    ids = b["input_ids"]
    b = to_model(b, model)
    with torch.inference_mode():  # no autograd bookkeeping at all: 3-4 % off a small model's forward
        acts = {L: a.cpu() for L, a in capture_residuals(model, b, layers).items()}
    sample_ids = torch.tensor([it.sample_id for it in part])
    splits = torch.tensor([SPLIT_CODES[it.split] for it in part])
    counts = {}
    for m, mask in (("text", text_mask), ("image", image_mask)):
        rows, cols = mask.nonzero(as_tuple=True)
        flat = rows * mask.shape[1] + cols  # the same tokens in [batch * seq] order
        meta = {"sample_id": sample_ids[rows].numpy(), "position": cols.numpy(),
                "token_id": ids[rows, cols].numpy(), "split": splits[rows].numpy()}
        for L in layers:
            x = acts[L].flatten(0, 1).index_select(0, flat)  # 1.5x faster than acts[L][rows, cols] here
            _check_finite(x, meta["sample_id"], L)
            writers[L].add(m, to_storage(x, dtype), meta)
        counts[m] = len(rows)
    return counts


def _check_finite(x: torch.Tensor, sample_ids: np.ndarray, layer: int) -> None:
    if torch.isfinite(x.sum()):  # fast path: a finite sum means no NaN/Inf (overflow only falls through)
        return
    bad = ~torch.isfinite(x).all(dim=-1)
    if bad.any():
        sid = int(sample_ids[bad.nonzero()[0, 0].item()])
        raise FloatingPointError(f"non-finite activation at layer {layer}, sample_id {sid}")


class ActivationStore:
    """Read one finished layer store. Refuses a store without the completion marker."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not (self.path / MARKER).is_file():
            raise RuntimeError(f"{self.path}: activation cache is incomplete (no {MARKER} marker); rerun the cache")
        self.group = zarr.open_group(self.path, mode="r")
        self.attrs = dict(self.group.attrs)
        self.summary = json.loads((self.path / MARKER).read_text())
        self._arrays: dict = {}

    def array(self, modality: str, name: str = "acts"):
        """The Zarr array (opened once: each open reads its metadata from disk)."""
        key = (modality, name)
        if key not in self._arrays:
            self._arrays[key] = self.group[modality][name]
        return self._arrays[key]

    def n_tokens(self, modality: str) -> int:
        return self.array(modality).shape[0]

    def acts(self, modality: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        return from_storage(self.array(modality)[start:stop], self.attrs["dtype"])

    def meta(self, modality: str, name: str) -> np.ndarray:
        return self.array(modality, name)[:]

    def split_rows(self, modality: str, split: str) -> tuple[int, int]:
        """[start, stop) of one data split's rows; the cache writes splits one after another."""
        codes = self.meta(modality, "split")
        where = np.flatnonzero(codes == SPLIT_CODES[split])
        if len(where) == 0:
            return 0, 0
        start, stop = int(where[0]), int(where[-1]) + 1
        if stop - start != len(where):
            raise RuntimeError(f"{self.path}: {modality} rows of split {split!r} are not contiguous")
        return start, stop
