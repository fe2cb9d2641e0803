"""Does the toy VLM look a named object up among its image tokens, or guess it?

Trains the toy VLM up to the end of its grounding stage (``train_toy_vlm``, the workflow's own
code, instruction tuning cut to one step) once per ``--attn-lr`` value, side by side in parallel,
and measures on val grounded captions ("The red circle 1 2. The sign 3 0 says stop."):

- ``row``: teacher-forced accuracy of the row digit, which the LM predicts at the name token;
- ``col``: the same for the column digit, predicted at the row digit;
- ``on named`` / ``on other``: from the name token, the largest attention weight over all layers
  and heads on the named object's patch, and that head's weight on the most-attended other object's
  patch. A head that looks the object up puts far more on the first; a diffuse read of the image
  puts about the same on both.

    python benchmarks/toy_vlm_lookup.py [--attn-lr 3e-4 3e-3] [--steps 2000] [--seed 0]

Needs the toy world and base LM (``snakemake results/toy/world/base_lm``). 1 thread per run.
"""
from __future__ import annotations

import argparse
import copy
import time
from statistics import fmean
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pandas as pd
import torch
import yaml

from stagediff.config import validate
from stagediff.io import read_json
from stagediff.models.toy_lm import corpus_lines
from stagediff.models.toy_vlm import caption_items, train_toy_vlm
from stagediff.models.vlm import chat_prompt, eager_attention, encode_batch, load_image

REPO = Path(__file__).resolve().parents[1]


@torch.no_grad()
def caption_lookup(model, processor, captions) -> dict:
    """Row and column digit accuracy and the name token's attention on the named patch."""
    tok = processor.tokenizer
    digit = {tok.convert_tokens_to_ids(str(i)): i for i in range(10)}
    b = encode_batch(processor, [load_image(it.image_path) for it in captions],
                     [chat_prompt(processor, it.user_text, it.answer) for it in captions])
    with eager_attention(model):
        out = model(**b, output_attentions=True)
    pred = out.logits.argmax(-1)
    attn = torch.stack(out.attentions, 1)  # [caption, layer, head, query, key]
    rows, cols, on_named, on_other = [], [], [], []
    for n, ids in enumerate(b["input_ids"].tolist()):
        image = [p for p, t in enumerate(ids) if t == model.config.image_token_id]
        side = round(len(image) ** 0.5)  # patches in row-major order
        start = ids.index(tok.convert_tokens_to_ids("assistant"))
        digits = [p for p in range(start, len(ids)) if ids[p] in digit]  # row, column, row, ...
        objects = [(p, image[digit[ids[p]] * side + digit[ids[p + 1]]]) for p in digits[::2]]
        for p, patch in objects:
            rows.append(pred[n, p - 1].item() == ids[p])
            cols.append(pred[n, p].item() == ids[p + 1])
            w = attn[n, :, :, p - 1].flatten(0, 1)  # [layer * head, key], from the name token
            best = w[:, patch].argmax()
            on_named.append(w[best, patch].item())
            others = [q for _, q in objects if q != patch]
            on_other.append(w[best, others].max().item() if others else 0.0)
    return {"row": fmean(rows), "col": fmean(cols), "on named": fmean(on_named), "on other": fmean(on_other)}


def run(attn_lr: float, config: str, root: str, steps: int | None, seed: int, n_captions: int) -> dict:
    torch.set_num_threads(1)
    cfg = yaml.safe_load(Path(config).read_text())
    cfg["toy"]["root"] = root
    cfg = validate(cfg)
    vlm = copy.deepcopy(cfg["toy"]["vlm"]) | {"attn_lr": attn_lr, "steps": 1}
    vlm["grounding_steps"] = steps or vlm["grounding_steps"]
    data, prompts = cfg["data"], cfg["prompts"]
    neutral = prompts["neutral"].format(prompt=read_json(Path(data["neutral_prompts"]))[0])
    captions = caption_items(data, neutral, "val")[:n_captions]
    text = corpus_lines(Path(root) / "data" / "corpus.txt", cfg["toy"]["drift_lines"], rest=True)
    result, t0 = {}, time.time()

    def probe(model, processor, stage: str, step: int) -> None:
        if stage == "toy_vlm grounding" and step == vlm["grounding_steps"]:
            result.update(caption_lookup(model, processor, captions), seconds=time.time() - t0)

    train_toy_vlm(f"{root}/base_lm", data, prompts, None, vlm, cfg["toy"]["data"]["image_size"], seed,
                  text=text, probe=probe, probe_every=vlm["grounding_steps"])
    return {"attn_lr": attn_lr, "lm_lr": vlm["lm_lr"], "grounding steps": vlm["grounding_steps"], **result}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default=str(REPO / "config" / "config.yaml"))
    ap.add_argument("--root", default="results/toy/world", help="the toy world (data, base_lm) to train on")
    ap.add_argument("--attn-lr", type=float, nargs="+", default=[3e-4, 3e-3])
    ap.add_argument("--steps", type=int, help="grounding steps (default: the config's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--captions", type=int, default=300, help="val captions measured")
    a = ap.parse_args()
    with ProcessPoolExecutor(len(a.attn_lr)) as pool:
        rows = list(pool.map(run, a.attn_lr, *zip(*[(a.config, a.root, a.steps, a.seed, a.captions)] * len(a.attn_lr))))
    table = pd.DataFrame(rows)
    print(table.to_string(index=False, formatters={"attn_lr": "{:g}".format, "lm_lr": "{:g}".format},
                          float_format="{:.3f}".format))


if __name__ == "__main__":
    main()
