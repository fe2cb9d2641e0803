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
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from stagediff import config as sdc
from stagediff.cache import LayerStoreWriter, cache_batch
from stagediff.models.vlm import iter_batches
from stagediff.data.items import vqa_items
from stagediff.data.toy_world import generate_toy_world
from stagediff.models.toy_lm import train_base_lm
from stagediff.models.toy_vlm import build_vlm
from stagediff.models.vlm import decoder_layers


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

    def cache() -> Path:
        d = Path(tempfile.mkdtemp(dir=tmp))
        writer = LayerStoreWriter({L: d / f"L{L}.zarr" for L in layers}, model.config.text_config.hidden_size, c,
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
    ratios, refs, tb, tc = [], [], [], []
    for _ in range(a.repeats):
        t0 = time.perf_counter(); bare(); t1 = time.perf_counter(); cache(); t2 = time.perf_counter()
        plain_write(tmp / f"plain{len(tb)}.bin", n_bytes); t3 = time.perf_counter()
        tb.append(t1 - t0); tc.append(t2 - t1); ratios.append((t2 - t1) / (t1 - t0))
        refs.append((t1 - t0 + t3 - t2) / (t1 - t0))
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
