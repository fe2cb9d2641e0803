"""Image decoding off the model's path: the cache's batch loop with DataLoader workers vs without.

What the cache job does per batch, before the forward: decode the batch's JPEGs, pad them to
square (LLaVA-MORE), resize and normalise them to CLIP's 336 x 336, render the chat template and
tokenize (``stagediff.models.vlm.iter_batches``). On a GPU node the forward of a batch takes a
fixed time on the GPU while the host waits; here it is stood in by a sleep of that length (the
bf16 forward of the paper config's batch at 40 % of an H100/H200's peak, from the planner's FLOP
count), so the benchmark measures only what the workers change: whether the decoding hides behind
the forward. Images: COCO-sized 640 x 480 JPEGs (quality 90).

    python benchmarks/bench_loader.py [--batches 20] [--batch-size 16] [--workers 2] [--forward-s S]

Prints seconds per batch for the loop with 0 and with ``--workers`` workers, measured in one run,
and their ratio.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image
from transformers import CLIPImageProcessor

from stagediff import config as sdc
from stagediff import resources as res
from stagediff.data.items import Item
from stagediff.data.toy_world import generate_toy_world
from stagediff.models.toy_lm import train_base_lm
from stagediff.models.toy_vlm import build_vlm
from stagediff.models.vlm import iter_batches
from stagediff.plan import Arch


def paper_forward_s(batch: int) -> float:
    """One batch's forward through LLaVA-MORE (Llama-3.1-8B + CLIP-L/336) at the planner's rate."""
    arch = Arch(4096, 32, 14336, 576, 1024, 24, 4096, 128256)
    return res.forward_flops(arch, batch, 32, 576 + res.TEXT_TOKENS) / (res.PEAK["bf16"] * 0.4)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--forward-s", type=float, help="the stand-in forward (default: the paper model's)")
    a = ap.parse_args()
    forward = a.forward_s if a.forward_s is not None else paper_forward_s(a.batch_size)
    tmp = Path(tempfile.mkdtemp())
    t = sdc.load("config/config.yaml")["toy"]  # a tokenizer and a LLaVA processor to render prompts with
    generate_toy_world(tmp / "data", {**t["data"], "n_images": {"train": 1, "val": 1, "test": 1}}, 0)
    train_base_lm(tmp / "data" / "corpus.txt", tmp / "lm", {**t["base_lm"], "steps": 1}, 0)
    _, processor = build_vlm(tmp / "lm", t["vlm"], t["data"]["image_size"])
    processor.image_processor = CLIPImageProcessor(size={"shortest_edge": 336}, crop_size=336)
    processor.patch_size, processor.pad_to_square = 14, True
    rng = np.random.default_rng(0)
    items = []
    for i in range(a.batches * a.batch_size):
        path = tmp / f"{i:06d}.jpg"
        grad = np.linspace(0, 255, 640)[None, :, None] * np.ones((480, 1, 3))
        Image.fromarray((grad + rng.normal(0, 40, (480, 640, 3))).clip(0, 255).astype(np.uint8)).save(path, quality=90)
        items.append(Item(i, path, processor.image_token + "\nWhat is to the left of the cup?", "plate", ("plate",), "spatial", "other", "train"))

    def loop(workers: int) -> float:
        t0 = time.perf_counter()
        for _ in iter_batches(processor, items, a.batch_size, workers):
            time.sleep(forward)  # the GPU's forward; the host waits
        return (time.perf_counter() - t0) / a.batches

    loop(a.workers)  # warm: page cache, imports in the workers
    alone, overlapped = loop(0), loop(a.workers)
    print(f"stand-in forward {forward:.3f} s per batch of {a.batch_size}")
    print(f"decode in the loop:        {alone:.3f} s per batch")
    print(f"{a.workers} DataLoader workers:      {overlapped:.3f} s per batch")
    print(f"ratio (workers / in the loop): {overlapped / alone:.2f}; floor (forward alone): {forward / alone:.2f}")


if __name__ == "__main__":
    main()
