"""Which part of a spatial question can the toy LM shape learn from text alone?

The toy VLM answers "Is the A left of the B?" only after a late, machine-dependent drop in its
loss (BENCHMARKS.md, toy VLM on three seeds). This splits the question into its parts and trains
a fresh LM of the base LM's shape (``toy.base_lm`` of the config) on each, text only, with a new
random scene for every example (no data limit), answer-only loss. Prints val accuracy per task
every ``--every`` steps, side by side:

- ``question``: scene description + "Is the A <relation> the B?" -> yes/no (the whole task);
- ``lookup``:   scene description + "the A ?" -> A's row digit (find a named object's position);
- ``given``:    "Is the 1 2 <relation> the 0 3?" -> yes/no (the comparison, positions given);
- ``given_named``: "Is the red circle 1 2 <relation> the blue square 0 3?" -> yes/no (the same,
  each position after its object's name, where the VLM's question has the name alone).

``--init base`` starts every task from the world's trained base LM instead of a fresh one, as
the toy VLM starts from it; ``--init base_without_spatial`` from the base LM pretrained again (same
config, seed and tokenizer) on its corpus without the spatial questions and VSR captions.

    python benchmarks/toy_text_tasks.py [--steps 1500] [--tasks question lookup given given_named]
                                        [--init fresh|base|base_without_spatial] [--lr LR]

Needs the toy base LM (``snakemake results/toy/world/base_lm``). 1 thread per task.
"""
from __future__ import annotations

import argparse
import copy
import math
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import yaml
from transformers import AutoTokenizer, LlamaForCausalLM

from stagediff.data import toy_scenes as ts
from stagediff.data.items import question_family
from stagediff.data.toy_world import _balanced_relation, _describe
from stagediff.models.toy_lm import build_lm, corpus_lines, pretrain_lm

REPO = Path(__file__).resolve().parents[1]


def example(task: str, rng: np.random.Generator, d: dict) -> tuple[str, str]:
    objs = ts.sample_scene(rng, d["grid"], d["image_size"] // d["grid"], d["min_objects"], d["max_objects"], 0.0)
    a, b, rel = _balanced_relation(rng, objs)
    answer = "yes" if ts.relation_holds(a, b, rel) else "no"
    if task == "question":
        return f"{_describe(objs)} Is the {a.name} {ts.RELATION_PHRASES[rel]} the {b.name}?", answer
    if task == "lookup":
        return f"{_describe(objs)} the {a.name} ?", str(a.row)
    if task == "given":
        return f"Is the {a.row} {a.col} {ts.RELATION_PHRASES[rel]} the {b.row} {b.col}?", answer
    if task == "given_named":
        return (f"Is the {a.name} {a.row} {a.col} {ts.RELATION_PHRASES[rel]} the {b.name} {b.row} {b.col}?",
                answer)
    raise ValueError(f"unknown task {task!r}")


def without_spatial(corpus: str, tok, cfg: dict, seed: int, spatial: list[str]):
    """The base LM's pretraining again, on its corpus without the spatial questions and VSR
    captions (the lines it answers with a constant: in 1,500 steps it learns no lookup in the scene
    description before them), with the same tokenizer.
    ``spatial``: the config's ``question_splits.spatial`` keywords, the workflow's own test."""
    lines = [x for x in corpus_lines(corpus) if question_family(x, {"spatial": spatial}) != "spatial"]
    return pretrain_lm(tok, lines, cfg, seed)


def curve(task: str, tok, cfg: dict, data: dict, steps: int, every: int, seed: int,
          init: LlamaForCausalLM | None = None) -> dict[int, float]:
    """Val accuracy every ``every`` steps of a fresh LM of ``cfg``'s shape, or of a copy of ``init``."""
    torch.manual_seed(seed)
    model = copy.deepcopy(init) if init is not None else build_lm(cfg, tok)

    def enc(prompt: str, answer: str) -> tuple[list[int], list[int]]:
        return ([tok.bos_token_id] + tok(prompt, add_special_tokens=False)["input_ids"],
                tok(answer, add_special_tokens=False)["input_ids"])

    val_rng, rng = np.random.default_rng(seed + 1), np.random.default_rng(seed)
    val = [enc(*example(task, val_rng, data)) for _ in range(600)]

    def batch(ex):
        n = max(len(p) + len(x) for p, x in ex)
        ids = torch.full((len(ex), n), tok.pad_token_id)
        labels = torch.full_like(ids, -100)
        for r, (p, x) in enumerate(ex):
            ids[r, : len(p) + len(x)] = torch.tensor(p + x)
            labels[r, len(p) : len(p) + len(x)] = torch.tensor(x)
        return ids, labels

    opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=0.01, betas=(0.9, 0.98))
    out = {}
    for step in range(steps):  # the schedule of stagediff.models.train.train_loop
        for g in opt.param_groups:
            g["lr"] = cfg["lr"] * min(1.0, (step + 1) / 50) * 0.5 * (1 + math.cos(math.pi * step / steps))
        ids, labels = batch([enc(*example(task, rng, data)) for _ in range(cfg["batch_size"])])
        loss = model(input_ids=ids, attention_mask=(ids != tok.pad_token_id).long(), labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if (step + 1) % every == 0:
            with torch.no_grad():
                ids, _ = batch(val)
                logits = model(input_ids=ids, attention_mask=(ids != tok.pad_token_id).long()).logits
                at = torch.tensor([len(p) - 1 for p, _ in val])
                pred = logits[torch.arange(len(val)), at].argmax(-1)
                out[step + 1] = (pred == torch.tensor([x[0] for _, x in val])).float().mean().item()
            print(f"{task} step {step + 1}: val accuracy {out[step + 1]:.3f}", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default=str(REPO / "config" / "config.yaml"))
    ap.add_argument("--base-lm", default="results/toy/world/base_lm", help="its tokenizer, and the model for --init base")
    ap.add_argument("--tasks", nargs="+", default=["question", "lookup", "given", "given_named"])
    ap.add_argument("--corpus", default="results/toy/world/data/corpus.txt", help="for --init base_without_spatial")
    ap.add_argument("--init", choices=["fresh", "base", "base_without_spatial"], default="fresh")
    ap.add_argument("--lr", type=float, help="default: toy.base_lm.lr")
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--every", type=int, default=250)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    torch.set_num_threads(1)
    config = yaml.safe_load(Path(a.config).read_text())
    toy = config["toy"]
    tok = AutoTokenizer.from_pretrained(a.base_lm)
    init = {"fresh": lambda: None,
            "base": lambda: LlamaForCausalLM.from_pretrained(a.base_lm, use_safetensors=True),
            "base_without_spatial": lambda: without_spatial(a.corpus, tok, toy["base_lm"], config["seed"],
                                                            config["question_splits"]["spatial"])}[a.init]()
    cfg = toy["base_lm"] | ({"lr": a.lr} if a.lr else {})
    table = pd.DataFrame({t: curve(t, tok, cfg, toy["data"], a.steps, a.every, a.seed, init) for t in a.tasks})
    table.index.name = "step"
    print(table.round(3).to_string())


if __name__ == "__main__":
    main()
