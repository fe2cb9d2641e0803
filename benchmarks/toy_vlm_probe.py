"""Where does the toy VLM's spatial skill fail: finding a named object, or comparing two?

Trains the toy VLM (``stagediff.models.toy_vlm.train_toy_vlm``, the workflow's own code) on an
existing toy world once per run (prompt layout × ``toy.vlm.text_every``), in parallel, and measures along grounding and
instruction tuning, on the val split:

- ``lookup``: grounded captions ("The red circle 1 2."), teacher-forced: the share of row and
  column digits predicted right, i.e. how often the LM finds the named object's patch;
- ``spatial``, ``vsr``, ``general``, ``ocr``: greedy answers, as the workflow's accuracy table;
- ``drift``: the largest residual-norm ratio VLM / base LM over layers on ``toy.drift_lines`` corpus lines.

Layouts: ``image_first`` is the config's prompts ("<image> {question}", LLaVA's usual order);
``question_first`` moves the image after the text ("{question} <image>", the other order in
LLaVA's instruction data).

    python benchmarks/toy_vlm_probe.py [--layouts image_first question_first] [--text-every 0 4] [--steps 4000]

One run per layout and ``toy.vlm.text_every`` value (every n-th batch text-only corpus lines; 0:
none), all in parallel. Needs the toy world and base LM (``snakemake results/toy/world/base_lm``).
1 thread per run.
"""
from __future__ import annotations

import argparse
import copy
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pandas as pd
import torch
import yaml
from transformers import AutoTokenizer, LlamaForCausalLM

from stagediff.config import validate
from stagediff.data.items import Item, vqa_items, vsr_items
from stagediff.evaluate_vlm import accuracy_table, predict
from stagediff.io import read_json
from stagediff.models.drift import drift_table
from stagediff.models.toy_lm import corpus_lines
from stagediff.models.toy_vlm import caption_items, train_toy_vlm
from toy_vlm_lookup import caption_lookup

REPO = Path(__file__).resolve().parents[1]


def layout_prompts(prompts: dict, layout: str) -> dict:
    if layout == "image_first":
        return prompts
    if layout == "question_first":
        return {k: t.replace("<image> ", "", 1) + " <image>" for k, t in prompts.items()}
    raise ValueError(f"unknown layout {layout!r}")


def _lookup(model, processor, captions: list[Item]) -> float:
    """Teacher-forced digit accuracy on grounded captions: rows and columns together."""
    r = caption_lookup(model, processor, captions)
    return (r["row"] + r["col"]) / 2  # every object has one of each


def run(layout: str, text_every: int | None, config: str, root: str, base_lm: str, steps: int | None,
        every: int) -> list[dict]:
    torch.set_num_threads(1)
    cfg = yaml.safe_load(Path(config).read_text())
    cfg["toy"]["root"] = root
    cfg = validate(cfg)
    vlm = copy.deepcopy(cfg["toy"]["vlm"]) | ({"steps": steps} if steps else {})
    vlm["text_every"] = vlm["text_every"] if text_every is None else text_every
    run_name = f"{layout}, text_every {vlm['text_every']}"
    data, prompts = cfg["data"], layout_prompts(cfg["prompts"], layout)
    neutral = prompts["neutral"].format(prompt=read_json(Path(data["neutral_prompts"]))[0])
    captions = caption_items(data, neutral, "val")[:200]
    items = (vqa_items(data, "val", prompts, cfg["question_splits"]) + vsr_items(data, "val", prompts))
    tokenizer = AutoTokenizer.from_pretrained(base_lm)
    base = LlamaForCausalLM.from_pretrained(base_lm, use_safetensors=True).eval()
    corpus = Path(root) / "data" / "corpus.txt"
    lines = corpus_lines(corpus, cfg["toy"]["drift_lines"])  # the drift's; the VLM trains on the rest
    text = corpus_lines(corpus, cfg["toy"]["drift_lines"], rest=True)
    rows = []

    def probe(model, processor, stage: str, step: int) -> None:
        acc = accuracy_table(items, predict(model, processor, items, 64, 3)).set_index("family")["accuracy"]
        drift = drift_table(base, model, tokenizer, lines, cfg["layers"])["norm_ratio"].max()
        rows.append({"run": run_name, "stage": stage.removeprefix("toy_vlm "), "step": step,
                     "lookup": _lookup(model, processor, captions), **acc.to_dict(),
                     "drift": drift})
        print(rows[-1], flush=True)

    train_toy_vlm(base_lm, data, prompts, None, vlm, cfg["toy"]["data"]["image_size"], cfg["seed"],
                  text=text, probe=probe, probe_every=every)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default=str(REPO / "config" / "config.yaml"))
    ap.add_argument("--root", default="results/toy/world", help="the toy world (data, base_lm) to train on")
    ap.add_argument("--base-lm", help="default: <root>/base_lm")
    ap.add_argument("--layouts", nargs="+", default=["image_first", "question_first"])
    ap.add_argument("--text-every", type=int, nargs="+", default=[None],
                    help="toy.vlm.text_every values to compare (default: the config's)")
    ap.add_argument("--steps", type=int, help="instruction-tuning steps (default: the config's)")
    ap.add_argument("--every", type=int, default=1000)
    a = ap.parse_args()
    base_lm = a.base_lm or f"{a.root}/base_lm"
    runs = [(lay, te) for lay in a.layouts for te in a.text_every]
    with ProcessPoolExecutor(len(runs)) as pool:
        futures = [pool.submit(run, lay, te, a.config, a.root, base_lm, a.steps, a.every) for lay, te in runs]
        results = [f.result() for f in futures]
    metrics = ["lookup", "spatial", "vsr", "general", "ocr", "drift"]
    names = [r[0]["run"] for r in results]
    table = pd.DataFrame([x for r in results for x in r]).pivot(index=["stage", "step"], columns="run", values=metrics)
    print(table.swaplevel(axis=1)[[(n, m) for n in names for m in metrics]].round(3).to_string())


if __name__ == "__main__":
    main()
