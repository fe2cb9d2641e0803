"""Per-layer activation cache in Zarr v3 (paper §4.1).

Layout of ``L<layer>.zarr`` (one store per layer)::

    text/acts     [n_text, d_model]   residual activations (bf16 stored as a uint16 view by default)
    text/sample_id, text/position, text/token_id, text/split   one entry per cached token
    image/...     the same for image tokens
    COMPLETE      JSON marker, written last (a store without it is never read): row counts and
                  every shard file's size, so a reader proves the store whole before using it

Rows are appended in whole shards (the Zarr v3 sharding codec), so a layer's store is a handful
of files and the single writer never rewrites a shard. The stores of one job hold the same tokens,
so their metadata columns are one set of files, hard-linked into every store of the job (stores
are read-only once complete; deleting one leaves the others whole). Padding and BOS tokens are not
cached: padding carries no data and BOS is an out-of-distribution massive-norm token that every
SAE stage would have to drop anyway.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path

import google_crc32c
import numpy as np
import torch
import zarr
from zarr.core.buffer.cpu import NDBuffer
from zarr.core.group import GroupMetadata
from zarr.storage import FsspecStore, LocalStore, MemoryStore

from stagediff.capture import capture_residuals
from stagediff.data.items import SPLIT_CODES, Item
from stagediff.io import atomic_dir, read_json
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


class StoreDamaged(RuntimeError):
    """A store that cannot be proven whole: a missing or short shard, wrong row counts, or
    non-finite values where it is read. The message names the store and what is wrong."""


def to_storage(x: torch.Tensor, dtype: str) -> np.ndarray:
    """bf16 has no Zarr dtype: store its bit pattern as uint16 (exact round trip)."""
    x = x.to(getattr(torch, dtype))
    if dtype == "bfloat16":
        return x.view(torch.int16).cpu().numpy().view(np.uint16)
    return x.cpu().numpy()


def stored_tensor(a: np.ndarray, dtype: str) -> torch.Tensor:
    """The rows as a CPU tensor in their storage dtype (bf16 from its uint16 bits; no copy)."""
    if dtype == "bfloat16":
        return torch.from_numpy(np.ascontiguousarray(a).view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(np.ascontiguousarray(a))


@functools.lru_cache  # immutable, and the same for every layer store of a job
def _column_metadata(width: int | None, dtype, chunk_rows: int, shard_rows: int):
    """Zarr v3 metadata of one column: empty, grown along axis 0 in whole shards, uncompressed
    (the layout ``_ShardedColumn`` writes: little-endian chunks, index at the end with a crc32c)."""
    shape, chunks, shards = (0,), (chunk_rows,), (shard_rows,)
    if width is not None:
        shape, chunks, shards = (0, width), (chunk_rows, width), (shard_rows, width)
    return zarr.create_array(MemoryStore(), shape=shape, dtype=dtype, chunks=chunks, shards=shards,
                             compressors=None, fill_value=0).metadata


class _DropBehind:
    """Evicts the shard files a writer wrote from the page cache, one file behind it.

    Why: the cache is written once and read by later jobs, often on other nodes, and at paper scale
    it is far larger than RAM, so keeping its pages buys nothing and evicts pages worth keeping (the
    model's weight files, the images). Dropped one file behind, by when it is written back, the
    shards stream to disk steadily and new shards reuse the freed pages. On this project's VM, where
    fresh pages are slow, that halves the writer's time (BENCHMARKS.md). A no-op without fadvise.
    """

    def __init__(self):
        self.last: str | None = None

    def __call__(self, f) -> None:
        """``f``: the shard file just written, still open."""
        if not hasattr(os, "posix_fadvise"):
            return
        f.flush()
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)  # starts its writeback
        if self.last is not None:
            fd = os.open(self.last, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # written back by now: its pages are freed
            finally:
                os.close(fd)
        self.last = f.name


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

    def __init__(self, metadata, root: Path, drop_behind: _DropBehind):
        self.metadata, self.root, self.drop_behind = metadata, root, drop_behind
        self.chunk_rows = metadata.codecs[0].chunk_shape[0]
        dtype = metadata.data_type.to_native_dtype().newbyteorder("<")
        self.buf = np.zeros(metadata.chunk_grid.chunk_shape, dtype=dtype)  # one shard; rows are copied once, here
        self.n = 0  # rows waiting in buf
        self.rows = 0  # rows written to shard files
        self.files: list[Path] = []

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
        path = self.root / self.metadata.encode_chunk_key((len(self.files),) + (0,) * (self.buf.ndim - 1))
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as f:
            f.write(memoryview(self.buf[: used * self.chunk_rows]).cast("B"))
            f.write(index + np.uint32(google_crc32c.value(index)).astype("<u4").tobytes())
            self.drop_behind(f)
        self.files.append(path)
        self.rows, self.n = self.rows + self.n, 0

    def close(self):
        """Write the last, partial shard; return the array's metadata with its final shape."""
        if self.n:
            self._write_shard()
        return self.metadata.update_shape((self.rows, *self.buf.shape[1:]))


class LayerStoreWriter:
    """The stores of one job, one per layer: activation shards as rows arrive, every node's
    zarr.json at ``close``. The token metadata is written once, into the first layer's store, and
    hard-linked into the others at ``close`` (copied where the file system has no hard links)."""

    def __init__(self, paths: dict[int, Path], d_model: int, cfg: dict, attrs: dict):
        self.paths, self.attrs = paths, attrs
        chunk, shard = cfg["chunk_rows"], cfg["chunk_rows"] * cfg["chunks_per_shard"]
        acts = _column_metadata(d_model, "uint16" if cfg["dtype"] == "bfloat16" else cfg["dtype"], chunk, shard)
        drop = _DropBehind()
        self.acts = {L: {m: _ShardedColumn(acts, p / m / "acts", drop) for m in MODALITIES} for L, p in paths.items()}
        self.first = paths[min(paths)]
        self.meta = {m: {name: _ShardedColumn(_column_metadata(None, dt, chunk, shard), self.first / m / name, drop)
                         for name, dt in META.items()} for m in MODALITIES}

    def add(self, modality: str, acts: dict[int, np.ndarray], meta: dict[str, np.ndarray]) -> None:
        """One batch's rows of one modality: ``acts`` per layer, ``meta`` shared by all layers."""
        for L, rows in acts.items():
            self.acts[L][modality].add(rows)
        for name, col in meta.items():
            self.meta[modality][name].add(col)

    def close(self, summary: dict) -> None:
        meta = {f"{m}/{name}": col.close() for m, cols in self.meta.items() for name, col in cols.items()}
        files = [f for cols in self.meta.values() for col in cols.values() for f in col.files]
        shared = {f.relative_to(self.first).as_posix(): f.stat().st_size for f in files}
        for L, path in self.paths.items():
            if path != self.first:
                for f in files:
                    _link(f, path / f.relative_to(self.first))
            own = {f.relative_to(path).as_posix(): f.stat().st_size
                   for col in self.acts[L].values() for f in col.files}
            nodes = {"": GroupMetadata(attributes={**self.attrs, "layer": L}), **meta}
            nodes.update({m: GroupMetadata() for m in MODALITIES})
            nodes.update({f"{m}/acts": col.close() for m, col in self.acts[L].items()})
            # one call writes every node's metadata concurrently, instead of a round trip per node
            dict(zarr.create_hierarchy(store=LocalStore(path), nodes=nodes))
            rows = {f"n_{m}": col.rows for m, col in self.acts[L].items()}
            (path / MARKER).write_text(json.dumps({**summary, **rows, "shards": {**own, **shared}}, sort_keys=True))


def _link(src: Path, dst: Path) -> None:
    """A hard link: the same bytes without a new inode (cluster quotas count inodes); else a copy."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:  # e.g. a file system without hard links
        shutil.copyfile(src, dst)


def cache_activations(model, processor, items: list[Item], layers: list[int], outputs: dict[int, Path],
                      cfg: dict, attrs: dict, train_outputs: dict[int, Path] | None = None, workers: int = 0) -> None:
    """Run the model once per batch and write every owned layer's store (atomically).

    ``train_outputs``: stores of their own for the train split's rows (91 % of the paper world's
    bytes, read only by SAE training, so the workflow can delete them once that is done); None:
    every split goes to ``outputs``. Empty ``outputs``: only train rows are cached (a sample
    shard's job other than the first). The train split is cached first, then the held-out splits,
    so only one set of shard buffers is alive at a time. ``workers``: DataLoader processes that
    decode and encode the images off the model's path (a speed knob: the stores are the same).
    """
    sets = [(outputs, [it for it in items if train_outputs is None or it.split != "train"])] if outputs else []
    if train_outputs is not None:
        sets.insert(0, (train_outputs, [it for it in items if it.split == "train"]))
    with contextlib.ExitStack() as stack:  # all layer stores appear together, or none does
        for outs, part in sets:
            tmps = {L: stack.enter_context(atomic_dir(p)) for L, p in outs.items()}
            _write_stores(model, processor, part, layers, tmps, cfg, attrs, workers)


def _write_stores(model, processor, items: list[Item], layers: list[int], paths: dict[int, Path], cfg: dict,
                  attrs: dict, workers: int) -> None:
    writer = LayerStoreWriter(paths, model.config.text_config.hidden_size, cfg, attrs)
    counts = {m: 0 for m in MODALITIES}
    t0, done = time.time(), 0
    n_batches = (len(items) + cfg["batch_size"] - 1) // cfg["batch_size"]
    for bi, (part, b) in enumerate(iter_batches(processor, items, cfg["batch_size"], workers)):
        for m, n in cache_batch(model, part, b, layers, writer, cfg["dtype"]).items():
            counts[m] += n
        done += len(part)
        if bi % max(1, n_batches // 10) == 0 or bi == n_batches - 1:
            dt = time.time() - t0
            log.info("cache: %d/%d samples, %.0f tokens/s, ETA %.0fs", done, len(items),
                     (counts["text"] + counts["image"]) / max(dt, 1e-9), dt / done * (len(items) - done))
    writer.close({"n_samples": len(items)})


def cache_batch(model, part: list[Item], b: dict, layers: list[int], writer: LayerStoreWriter,
                dtype: str) -> dict[str, int]:
    """One forward for one batch; append every owned layer's text and image rows."""
    image_mask, text_mask = token_masks(b, model)
    ids = b["input_ids"]
    with torch.inference_mode():  # no autograd bookkeeping at all: 3-4 % off a small model's forward
        acts = capture_residuals(model, to_model(b, model), layers)
    # the cached tokens, text ones first: one gather, check and cast per layer serves both modalities,
    # on the model's device, so only the kept rows (no padding) cross to the host
    text, image = text_mask.nonzero(as_tuple=True), image_mask.nonzero(as_tuple=True)
    rows, cols = torch.cat([text[0], image[0]]), torch.cat([text[1], image[1]])
    flat = (rows * ids.shape[1] + cols).to(acts[layers[0]].device)  # the same tokens in [batch * seq] order
    r = rows.numpy()
    meta = {"sample_id": np.array([it.sample_id for it in part])[r], "position": cols.numpy(),
            "token_id": ids[rows, cols].numpy(), "split": np.array([SPLIT_CODES[it.split] for it in part])[r]}
    stored = {}
    for L in layers:
        x = acts[L].flatten(0, 1).index_select(0, flat)  # 1.5x faster than acts[L][rows, cols] here
        x = x.to(getattr(torch, dtype))  # checked as stored: fp16 storage turns a large value into Inf
        _check_finite(x, meta["sample_id"], L, dtype)
        stored[L] = to_storage(x, dtype)
    n_text = len(text[0])
    for m, span in (("text", slice(0, n_text)), ("image", slice(n_text, None))):
        writer.add(m, {L: a[span] for L, a in stored.items()}, {k: v[span] for k, v in meta.items()})
    return {"text": n_text, "image": len(rows) - n_text}


def first_nonfinite_row(x: torch.Tensor) -> int | None:
    """The first row of ``x`` holding a NaN or Inf, or None. ``aminmax`` decides (NaN propagates
    into it, an Inf is its min or max): exact, in the storage dtype, and 20x faster than a float32
    sum of bf16 rows on the CPU (4 vs 79 ms for 64 MB here; a float32 sum cut the stream
    to 0.24 of the disk, bench_stream.py)."""
    if len(x) == 0 or all(torch.isfinite(v) for v in torch.aminmax(x)):
        return None
    return int((~torch.isfinite(x)).any(dim=-1).nonzero()[0, 0])


def _check_finite(x: torch.Tensor, sample_ids: np.ndarray, layer: int, dtype: str) -> None:
    row = first_nonfinite_row(x)
    if row is not None:
        raise FloatingPointError(f"non-finite activation at layer {layer}, sample_id {int(sample_ids[row])}, "
                                 f"as stored in cache.dtype {dtype}")


class ActivationStore:
    """Read one finished layer store, proven whole on open: the completion marker is there, every
    shard file it lists has its size, and the arrays have its row counts. Every read checks its
    rows are finite. Each failure is a ``StoreDamaged`` naming the store and the file or rows.

    ``path``: a local folder, or an fsspec URL (``s3://bucket/L12.zarr``, ``gs://``, ...) read
    through zarr's ``FsspecStore``, e.g. a cache kept in object storage for the read-only stages."""

    def __init__(self, path: str | Path):
        self.path = str(path).rstrip("/") if "://" in str(path) else Path(path)
        sizes = self._url_sizes() if isinstance(self.path, str) else None
        size = sizes.get if sizes is not None else self._local_size
        if size(MARKER) is None:
            raise StoreDamaged(f"{self.path}: activation cache is incomplete (no {MARKER} marker); rerun the cache")
        try:
            if sizes is None:
                self.summary = read_json(self.path / MARKER)
                self.group = zarr.open_group(self.path, mode="r")
            else:
                self.summary = json.loads(self._fs.cat_file(f"{self._root}/{MARKER}"))
                self.group = zarr.open_group(FsspecStore.from_url(self.path, read_only=True), mode="r")
        except (ValueError, OSError) as e:
            raise StoreDamaged(f"{self.path}: unreadable ({e}); delete it and rerun the cache") from None
        self.attrs = dict(self.group.attrs)
        self._arrays: dict = {}
        self._verify(size)

    def _local_size(self, rel: str) -> int | None:
        f = self.path / rel
        return f.stat().st_size if f.is_file() else None

    def _url_sizes(self) -> dict[str, int]:
        """Every file's size under the URL, from one listing (not a request per shard)."""
        import fsspec

        self._fs, self._root = fsspec.core.url_to_fs(self.path)
        self._root = self._root.rstrip("/")
        return {p[len(self._root) + 1 :]: d["size"] for p, d in self._fs.find(self._root, detail=True).items()}

    def _verify(self, size) -> None:
        damaged = f"; the store is damaged: delete {self.path} and rerun the cache"
        if "shards" not in self.summary:
            raise StoreDamaged(f"{self.path}: its {MARKER} marker lists no shard sizes (written by an older "
                               f"stagediff){damaged}")
        for rel, expected in self.summary["shards"].items():
            actual = size(rel)
            if actual != expected:
                what = "missing" if actual is None else f"{actual} bytes, expected {expected}"
                raise StoreDamaged(f"{self.path}: shard {rel} is {what}{damaged}")
        for m in MODALITIES:
            try:
                self.n_tokens(m)
            except KeyError:
                raise StoreDamaged(f"{self.path}: no {m}/acts array{damaged}") from None
            if self.n_tokens(m) != self.summary[f"n_{m}"]:
                raise StoreDamaged(f"{self.path}: {m}/acts has {self.n_tokens(m)} rows, its marker says "
                                   f"{self.summary[f'n_{m}']}{damaged}")

    def check_finite(self, t: torch.Tensor, modality: str, start: int) -> torch.Tensor:
        """``t``: rows ``start : start + len(t)`` of ``modality``, as read (on any device)."""
        row = first_nonfinite_row(t)
        if row is not None:
            raise StoreDamaged(f"{self.path}: non-finite activation in {modality} rows [{start}, {start + len(t)}) "
                               f"(first at row {start + row}); the store is damaged: delete it and rerun the cache")
        return t

    def array(self, modality: str, name: str = "acts"):
        """The Zarr array (opened once: each open reads its metadata from disk)."""
        key = (modality, name)
        if key not in self._arrays:
            self._arrays[key] = self.group[modality][name]
        return self._arrays[key]

    def n_tokens(self, modality: str) -> int:
        return self.array(modality).shape[0]

    def chunk_rows(self, modality: str) -> int:
        return self.array(modality).chunks[0]

    def check_width(self, d_model: int, what: str) -> None:
        """Refuse an SAE (``what``: which, and its file) whose d_model is not this store's width."""
        width = self.array("image").shape[1]
        if d_model != width:
            raise ValueError(f"{what} has d_model {d_model}, but {self.path} holds {width}-wide activations: "
                             f"base_sae.path and the model (model.vlm) do not match")

    def acts(self, modality: str, start: int = 0, stop: int | None = None,
             device: torch.device | str = "cpu") -> torch.Tensor:
        """float32 on ``device``; moved as stored (bf16: half the bytes) and widened there."""
        return self.stored(modality, start, stop).to(device).float()

    def stored(self, modality: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Rows in the storage dtype on the CPU (the stream's read: widened only per batch)."""
        return self.check_finite(stored_tensor(self.array(modality)[start:stop], self.attrs["dtype"]), modality, start)

    def read_into(self, modality: str, start: int, out: torch.Tensor) -> None:
        """Rows ``start : start + len(out)`` written straight into ``out`` (a CPU tensor in the
        storage dtype): no fresh array per read, which halves zarr's read time here (BENCHMARKS.md).
        Unchecked: the caller tests the rows with ``check_finite``, as the stream does once per buffer."""
        raw = out.view(torch.int16) if out.dtype == torch.bfloat16 else out
        self.array(modality).get_basic_selection(slice(start, start + len(out)),
                                                 out=NDBuffer.from_numpy_array(raw.numpy()))

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


class StoreParts:
    """One layer's train split as cached by ``cache.sample_shards`` jobs, one part store each, read
    as one store: rows in part order. What the SAE stream reads (``split_rows``, ``read_into``,
    ``stored``, ``check_finite``); a row range across two parts is read from each. The parts must
    come from the same cache settings (their ``config_hash``) and have the same width."""

    def __init__(self, paths: list[str | Path]):
        self.parts = [ActivationStore(p) for p in paths]
        first = self.parts[0]
        for part in self.parts[1:]:
            if part.attrs.get("config_hash") != first.attrs.get("config_hash"):
                raise StoreDamaged(f"{part.path}: cached with other settings than {first.path}; rerun the cache")
            part.check_width(first.array("image").shape[1], f"the part store {first.path}")
        # in messages: the parts' folder (a local path or an fsspec URL), or the one store
        self.path = str(first.path).rsplit("/", 1)[0] if len(paths) > 1 else first.path
        self.attrs = first.attrs
        self._starts = {m: np.cumsum([0] + [p.n_tokens(m) for p in self.parts]) for m in MODALITIES}

    def n_tokens(self, modality: str) -> int:
        return int(self._starts[modality][-1])

    def chunk_rows(self, modality: str) -> int:
        return self.parts[0].chunk_rows(modality)

    def check_width(self, d_model: int, what: str) -> None:
        self.parts[0].check_width(d_model, what)

    def _pieces(self, modality: str, start: int, stop: int):
        """(part, its start, its stop, offset into the range) of the parts rows [start, stop) span."""
        starts = self._starts[modality]
        for i, part in enumerate(self.parts):
            lo, hi = max(start, int(starts[i])), min(stop, int(starts[i + 1]))
            if lo < hi:
                yield part, lo - int(starts[i]), hi - int(starts[i]), lo - start

    def split_rows(self, modality: str, split: str) -> tuple[int, int]:
        rows = [(int(s) + a, int(s) + b) for part, s in zip(self.parts, self._starts[modality])
                for a, b in [part.split_rows(modality, split)] if b > a]
        if not rows:
            return 0, 0
        if any(prev[1] != nxt[0] for prev, nxt in zip(rows, rows[1:])):
            raise RuntimeError(f"{self.path}: {modality} rows of split {split!r} are not contiguous over its parts")
        return rows[0][0], rows[-1][1]

    def read_into(self, modality: str, start: int, out: torch.Tensor) -> None:
        for part, lo, hi, at in self._pieces(modality, start, start + len(out)):
            part.read_into(modality, lo, out[at : at + hi - lo])

    def stored(self, modality: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        stop = self.n_tokens(modality) if stop is None else stop
        return torch.cat([part.stored(modality, lo, hi) for part, lo, hi, _ in self._pieces(modality, start, stop)])

    def check_finite(self, t: torch.Tensor, modality: str, start: int) -> torch.Tensor:
        for part, lo, hi, at in self._pieces(modality, start, start + len(t)):
            part.check_finite(t[at : at + hi - lo], modality, lo)
        return t
