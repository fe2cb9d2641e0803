"""Cache overhead vs a bare HF forward, and forward calls per batch (issue [A] item 7).

Both sides run on the same pre-encoded batches of the same model, alternating, in one process:
  bare:  model(**batch, output_hidden_states=True)         (all layers come back, nothing stored)
  cache: stagediff.cache.cache_batch for all layers         (hooks, masks, bf16 view, Zarr shard files)
Prints the median time ratio cache/bare (goal <= 1.15), a reference (bare forward plus a plain
buffered f.write of the bytes the cache writes, pages left in the page cache) and forward calls per
batch (goal 1).

    python benchmarks/bench_cache.py [--config config/config.yaml] [--images 400] [--repeats 3] [--d-model N]

The model has the toy config's shapes with untrained weights (speed does not depend on them);
``--d-model`` widens the LM, to see how the ratio moves as the forward outweighs the writes.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import zarr
from zarr.storage import LocalStore

from stagediff import config as sdc
from stagediff.cache import MARKER, META, MODALITIES, LayerStoreWriter, _ShardedColumn, cache_batch
from stagediff.data.items import vqa_items
from stagediff.data.toy_world import generate_toy_world
from stagediff.models.toy_lm import train_base_lm
from stagediff.models.toy_vlm import build_vlm
from stagediff.models.vlm import decoder_layers, iter_batches


class _Column(_ShardedColumn):
    """One array of a layer store through zarr-python's public API, grown along axis 0: rows are
    gathered in one shard-sized buffer (``_ShardedColumn.add``, the cache's own buffering) and
    written as whole-shard slices (so Zarr encodes each shard once, never reading it back). The
    array's capacity doubles when full and is cut to the row count at ``close``: O(log n) metadata
    writes, not one per shard."""

    def __init__(self, group, name: str, width: int | None, dtype, chunk_rows: int, shard_rows: int):
        tail = () if width is None else (width,)
        self.arr = group.create_array(name, shape=(shard_rows, *tail), dtype=dtype, chunks=(chunk_rows, *tail),
                                      shards=(shard_rows, *tail), compressors=None, fill_value=0)
        self.buf = np.zeros((shard_rows, *tail), dtype=dtype)
        self.n = 0  # rows waiting in buf
        self.rows = 0  # rows written

    def _write_shard(self) -> None:  # what ``add`` calls when the buffer is full
        end = self.rows + self.n
        if end > self.arr.shape[0]:
            self.arr.resize((2 * self.arr.shape[0], *self.arr.shape[1:]))
        self.arr[self.rows : end] = self.buf[: self.n]
        self.rows, self.n = end, 0

    def close(self) -> None:
        if self.n:
            self._write_shard()
        self.arr.resize((self.rows, *self.arr.shape[1:]))


class ZarrLayerStoreWriter:
    """The baseline the cache's hand-written shard writer must beat by >= 10 % of the cache's total
    time to stay (issue [I]): the same stores, one per layer, through zarr-python's public API."""

    def __init__(self, paths: dict[int, Path], d_model: int, cfg: dict, attrs: dict):
        self.paths = paths
        chunk, shard = cfg["chunk_rows"], cfg["chunk_rows"] * cfg["chunks_per_shard"]
        acts = np.uint16 if cfg["dtype"] == "bfloat16" else np.dtype(cfg["dtype"])
        self.columns = {}
        for L, path in paths.items():
            root = zarr.open_group(LocalStore(path), mode="w", attributes={**attrs, "layer": L})
            for m in MODALITIES:
                g = root.create_group(m)
                self.columns[L, m, "acts"] = _Column(g, "acts", d_model, acts, chunk, shard)
                for name, dt in META.items():
                    self.columns[L, m, name] = _Column(g, name, None, dt, chunk, shard)

    def add(self, modality: str, acts: dict[int, np.ndarray], meta: dict[str, np.ndarray]) -> None:
        for L, rows in acts.items():
            self.columns[L, modality, "acts"].add(rows)
            for name, col in meta.items():
                self.columns[L, modality, name].add(col)

    def close(self, summary: dict) -> None:
        for col in self.columns.values():
            col.close()
        for path in self.paths.values():
            (path / MARKER).write_text(json.dumps(summary, sort_keys=True))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="config/config.yaml")
    ap.add_argument("--images", type=int, default=400)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--d-model", type=int, help="LM width instead of the config's (d_mlp = 4 x d_model)")
    a = ap.parse_args()
    cfg = sdc.load(a.config)
    t = cfg["toy"]
    if a.d_model:
        t["base_lm"].update(d_model=a.d_model, d_mlp=4 * a.d_model)
    tmp = Path(tempfile.mkdtemp())
    try:
        measure(a, cfg, t, tmp)
    finally:  # each run writes GBs of stores; leave nothing behind
        shutil.rmtree(tmp, ignore_errors=True)


def measure(a, cfg: dict, t: dict, tmp: Path) -> None:
    generate_toy_world(tmp / "data", {**t["data"], "n_images": {"train": a.images, "val": 1, "test": 1}}, 0)
    train_base_lm(tmp / "data" / "corpus.txt", tmp / "lm", {**t["base_lm"], "steps": 1}, 0)
    model, processor = build_vlm(tmp / "lm", t["vlm"], t["data"]["image_size"])
    model.eval()
    data = {**cfg["data"], "vqav2": {**cfg["data"]["vqav2"], "root": str(tmp / "data/vqav2"),
                                     "images": str(tmp / "data/images")}}
    items = vqa_items(data, "train", cfg["prompts"], cfg["question_splits"])
    c = cfg["cache"]
    batches = list(iter_batches(processor, items, c["batch_size"]))
    layers = list(range(model.config.text_config.num_hidden_layers))
    n_tok = sum(int(b["attention_mask"].sum()) for _, b in batches)

    def bare():
        with torch.no_grad():
            for _, b in batches:
                model(**b, output_hidden_states=True, use_cache=False)

    def cache(writer_class=LayerStoreWriter) -> Path:
        d = Path(tempfile.mkdtemp(dir=tmp))
        writer = writer_class({L: d / f"L{L}.zarr" for L in layers}, model.config.text_config.hidden_size, c,
                                  {"dtype": c["dtype"]})
        for part, b in batches:
            cache_batch(model, part, b, layers, writer, c["dtype"])
        t0 = time.perf_counter()
        writer.close({})
        t_close.append(time.perf_counter() - t0)
        return d

    t_close: list[float] = []
    files = {(s.st_dev, s.st_ino): s.st_size for f in cache().rglob("*") if f.is_file() for s in [f.stat()]}
    n_bytes = sum(files.values())  # each hard-linked metadata file once; cache() is also the warm-up
    bare()
    ratios, refs, tb, tc, tz = [], [], [], [], []
    for _ in range(a.repeats):
        t0 = time.perf_counter(); bare(); t1 = time.perf_counter(); cache(); t2 = time.perf_counter()
        plain_write(tmp / f"plain{len(tb)}.bin", n_bytes); t3 = time.perf_counter()
        tb.append(t1 - t0); tc.append(t2 - t1); ratios.append((t2 - t1) / (t1 - t0))
        refs.append((t1 - t0 + t3 - t2) / (t1 - t0))
        t4 = time.perf_counter(); cache(ZarrLayerStoreWriter); tz.append(time.perf_counter() - t4)
    calls = []
    h = decoder_layers(model)[0].register_forward_hook(lambda *_: calls.append(1))
    cache()
    h.remove()
    print(f"batches={len(batches)} tokens={n_tok} layers={len(layers)} d_model={model.config.text_config.hidden_size} "
          f"threads={torch.get_num_threads()}")
    print(f"bare forward (output_hidden_states): median {statistics.median(tb):.3f}s "
          f"({n_tok / statistics.median(tb):.0f} tok/s)")
    print(f"stagediff cache (all layers, Zarr):  median {statistics.median(tc):.3f}s "
          f"({n_tok / statistics.median(tc):.0f} tok/s), of which closing the {len(layers)} stores "
          f"(last shards, all zarr.json) {statistics.median(t_close):.3f}s")
    print(f"ratio cache/bare: median {statistics.median(ratios):.3f} (goal <= 1.15); runs {[round(r, 3) for r in ratios]}")
    print(f"reference (bare forward + plain f.write of the cache's {n_bytes / 1e6:.0f} MB to a new file) / bare: "
          f"median {statistics.median(refs):.3f}; runs {[round(r, 3) for r in refs]}")
    print(f"zarr-python public API writer: median {statistics.median(tz):.3f}s; hand-written shards save "
          f"{1 - statistics.median(tc) / statistics.median(tz):.1%} of the cache's total time "
          f"(runs {[round(x, 3) for x in tz]})")
    print(f"forward calls per batch for {len(layers)} layers: {len(calls) / len(batches):.2f} (goal 1)")


def plain_write(path: Path, n_bytes: int, block: int = 4 << 20) -> None:
    """Writing these bytes the plain way: buffered, pages left in the page cache."""
    buf = b"\x01" * block
    with open(path, "wb") as f:
        for _ in range(n_bytes // block):
            f.write(buf)
        f.write(buf[: n_bytes % block])


if __name__ == "__main__":
    main()
