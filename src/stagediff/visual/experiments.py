"""Neo et al.'s three experiments on the VLM: token ablation (Table 1), logit lens on visual tokens,
attention knockout (Table 2).

Objects come from COCO-format instances (toy world: exact boxes; paper world: COCO annotations).
An object's name is its category name ("red circle"; COCO: "dog"); its class word is the name's
last word (the word the logit lens looks for). Prompts are the config's, wrapped in ``prompts.vqa``:
``visual.describe`` (generative), ``visual.polling`` (binary polling, "Is there a {name}?" -> yes),
and in the toy world the VQA question "What shape is the {color} object?" (asked when the colour is
unique in the image) whose next token must be the shape.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from stagediff.data.items import Item
from stagediff.evaluate_vlm import predict
from stagediff.models.vlm import first_token, iter_batches, last_positions, next_token_probs, to_model, visual_embeddings
from stagediff.visual import tokens as vt
from stagediff.visual.interventions import block_attention, integrated_gradients, logit_lens, replace_visual_tokens

log = logging.getLogger(__name__)


@dataclass
class ObjectRecord:
    image_id: int
    image_path: Path
    name: str
    box: tuple
    image_wh: tuple[int, int]
    vqa: tuple[str, str] | None  # (question, answer word) when the world provides one
    patches: set[int] = field(default_factory=set)

    @property
    def word(self) -> str:
        return self.name.split()[-1]


def object_records(coco_file: str | Path, image_dir: str | Path, n_images: int, seed: int, grid: int,
                   pad_to_square: bool) -> list[ObjectRecord]:
    """One record per object (signs excluded: they have no class word) of ``n_images`` seeded images."""
    doc = json.loads(Path(coco_file).read_text())
    cats = {c["id"]: c["name"] for c in doc["categories"]}
    images = {im["id"]: im for im in doc["images"]}
    chosen = sorted(np.random.default_rng(seed).permutation(sorted(images))[:n_images].tolist())
    by_image: dict[int, list] = {}
    for a in doc["annotations"]:
        if a["image_id"] in set(chosen) and cats[a["category_id"]] != "sign":
            by_image.setdefault(a["image_id"], []).append(a)
    out = []
    for i in chosen:
        anns = by_image.get(i, [])
        colours = [cats[a["category_id"]].split()[0] for a in anns]
        im = images[i]
        for a in anns:
            name = cats[a["category_id"]]
            colour = name.split()[0]
            vqa = (f"What shape is the {colour} object?", name.split()[-1]) if len(name.split()) == 2 and colours.count(colour) == 1 else None
            wh = (im["width"], im["height"])
            out.append(ObjectRecord(i, Path(image_dir) / im["file_name"], name, tuple(a["bbox"]), wh, vqa,
                                    vt.object_patches(a["bbox"], wh, grid, pad_to_square)))
    return out


def _items(records: list[ObjectRecord], texts: list[str], prompt: str) -> list[Item]:
    return [Item(r.image_id, r.image_path, prompt.format(question=t), "", (), "visual", "", "") for r, t in zip(records, texts)]


def _probs(model, processor, items: list[Item], chosen: list[set[int]], mean, batch_size: int) -> torch.Tensor:
    out = []
    with replace_visual_tokens(model, chosen, mean):
        for _, b in iter_batches(processor, items, batch_size):
            out.append(next_token_probs(model, to_model(b, model)))
    return torch.cat(out)


def token_sets(model, processor, records: list[ObjectRecord], cfg: dict, prompts: dict, mean: torch.Tensor,
               grid: int, seed: int) -> dict[str, list[set[int]]]:
    """Per ablation type (Table 1's rows), the visual tokens of each record."""
    rng = np.random.default_rng(seed)
    n_tok = grid * grid
    sets = {"object": [r.patches for r in records],
            "object+1": [vt.with_buffer(r.patches, grid, 1) for r in records],
            "object+2": [vt.with_buffer(r.patches, grid, 2) for r in records]}
    yes = first_token(processor.tokenizer, cfg["yes_token"])
    poll = _items(records, [cfg["polling"].format(name=r.name) for r in records], prompts["vqa"])
    ig, regs = [], []
    for part, b in iter_batches(processor, poll, cfg["batch_size"]):
        b = to_model(b, model)
        regs += [vt.register_tokens(x) for x in visual_embeddings(model, b["pixel_values"])]
        ig += list(integrated_gradients(model, b, torch.full((len(part),), yes), mean, cfg["ig_steps"]))
    sets["register"] = regs
    for k in cfg["k"]:
        sets[f"int_gradients_{k}"] = [set(torch.topk(a, min(k, n_tok)).indices.tolist()) for a in ig]
        sets[f"random_{k}"] = [vt.random_tokens(n_tok, k, rng) for _ in records]
    sets["random_matched"] = [vt.random_tokens(n_tok, len(r.patches), rng) for r in records]
    return sets


def token_ablation(model, processor, records: list[ObjectRecord], sets: dict[str, list[set[int]]], cfg: dict,
                   prompts: dict, mean: torch.Tensor) -> pd.DataFrame:
    """Table 1: per ablation type, the share (%) of objects identified before and not after."""
    tok, bs = processor.tokenizer, cfg["batch_size"]
    describe = _items(records, [cfg["describe"]] * len(records), prompts["vqa"])
    poll = _items(records, [cfg["polling"].format(name=r.name) for r in records], prompts["vqa"])
    vqa_recs = [i for i, r in enumerate(records) if r.vqa]
    vqa = _items([records[i] for i in vqa_recs], [records[i].vqa[0] for i in vqa_recs], prompts["vqa"])
    yes = first_token(tok, cfg["yes_token"])
    answers = torch.tensor([first_token(tok, records[i].vqa[1]) for i in vqa_recs], dtype=torch.long)

    def outcomes(chosen):
        def gen():
            with replace_visual_tokens(model, list(chosen), mean):
                return predict(model, processor, describe, bs, cfg["max_new_tokens"])
        mention = np.array([r.name in text for r, text in zip(records, gen())])
        polling = (_probs(model, processor, poll, chosen, mean, bs).argmax(-1) == yes).numpy()
        picked = [chosen[i] for i in vqa_recs]
        vqa_ok = (_probs(model, processor, vqa, picked, mean, bs).argmax(-1) == answers).numpy() if vqa_recs else np.zeros(0, bool)
        return {"generative": mention, "polling": polling, "vqa": vqa_ok}

    # predict() and _probs() run the records in order, so the projector hook sees them in order
    clean = outcomes([set()] * len(records))
    rows = []
    for name, chosen in sets.items():
        after = outcomes(chosen)
        row = {"ablation": name, "avg_tokens": float(np.mean([len(c) for c in chosen]))}
        for m in ("generative", "polling", "vqa"):
            ok = clean[m]
            row[f"{m}_decrease_pct"] = 100 * float((ok & ~after[m]).sum() / ok.sum()) if ok.sum() else float("nan")
            row[f"{m}_n"] = int(ok.sum())
        rows.append(row)
        log.info("token ablation %-18s %s", name, {k: round(v, 1) for k, v in row.items() if k.endswith("pct")})
    return pd.DataFrame(rows)


def logit_lens_table(model, processor, records: list[ObjectRecord], prompts: dict, cfg: dict) -> tuple[pd.DataFrame, dict]:
    """Per layer and object: the share of the object's patches whose logit-lens top token is its class
    word; plus the top-token grids [layer, patch] of the first images (for the patch maps)."""
    tok = processor.tokenizer
    layers = list(range(model.config.text_config.num_hidden_layers))
    image_id = model.config.image_token_id
    rows, maps = [], {}
    items = _items(records, [cfg["describe"]] * len(records), prompts["vqa"])
    for start in range(0, len(records), cfg["batch_size"]):
        part = records[start : start + cfg["batch_size"]]
        (_, b), = iter_batches(processor, items[start : start + len(part)], len(part))
        b = to_model(b, model)
        top = logit_lens(model, b, layers)  # [layer, batch, seq]
        for j, r in enumerate(part):
            vis = b["input_ids"][j] == image_id
            grid_top = top[:, j, vis]  # [layer, n_image_tokens]
            word = first_token(tok, r.word)
            for layer in layers:
                hits = [int(grid_top[layer, p] == word) for p in sorted(r.patches)]
                rows.append({"image_id": r.image_id, "object": r.name, "layer": layer, "n_patches": len(hits),
                             "fraction": float(np.mean(hits)) if hits else float("nan")})
            if len(maps) < cfg["n_maps"] and r.image_id not in maps:
                maps[r.image_id] = {"image": str(r.image_path), "tokens": [[tok.decode([t]).strip() for t in row]
                                                                          for row in grid_top.tolist()]}
    return pd.DataFrame(rows), maps


def knockout_table(model, processor, records: list[ObjectRecord], cfg: dict, prompts: dict, grid: int) -> pd.DataFrame:
    """Table 2: per (from, to) group pair and layer window, accuracy and probability of the correct
    answer relative to no knockout, over the objects answered correctly without it. The question is
    the object's VQA question where the world has one (the paper's setting), else binary polling."""
    tok = processor.tokenizer
    probes = [r.vqa or (cfg["polling"].format(name=r.name), cfg["yes_token"]) for r in records]
    poll = _items(records, [q for q, _ in probes], prompts["vqa"])
    yes = torch.tensor([first_token(tok, a) for _, a in probes])
    image_id = model.config.image_token_id
    all_vis = set(range(grid * grid))
    groups = {("O", "LTP"): lambda r: (r.patches, None), ("O+1", "LTP"): lambda r: (vt.with_buffer(r.patches, grid, 1), None),
              ("O+2", "LTP"): lambda r: (vt.with_buffer(r.patches, grid, 2), None),
              ("I-(O+1)", "LTP"): lambda r: (all_vis - vt.with_buffer(r.patches, grid, 1), None),
              ("O+1", "LVR"): lambda r: (vt.with_buffer(r.patches, grid, 1), vt.last_row(grid)),
              ("I-LVR", "LVR"): lambda r: (all_vis - vt.last_row(grid), vt.last_row(grid))}
    batches = [(part, to_model(b, model)) for part, b in iter_batches(processor, poll, cfg["batch_size"])]
    clean = torch.cat([next_token_probs(model, b) for _, b in batches])
    ok = clean.argmax(-1) == yes
    rows_ = torch.arange(len(yes))
    rows = []
    for (src, dst), sel in groups.items():
        for window, (lo, hi) in cfg["windows"].items():
            probs = []
            for i, (part, b) in enumerate(batches):
                t = b["input_ids"].shape[1]
                block = torch.zeros(len(part), t, t, dtype=torch.bool)
                last = last_positions(b)
                for j in range(len(part)):
                    vis_pos = torch.nonzero(b["input_ids"][j] == image_id).flatten()
                    frm, to = sel(records[i * cfg["batch_size"] + j])
                    keys = vis_pos[sorted(frm)] if frm else vis_pos[:0]
                    queries = vis_pos[sorted(to)] if to is not None else last[j : j + 1]
                    block[j][queries[:, None], keys[None, :]] = True
                with block_attention(model, list(range(lo, hi + 1)), block):
                    probs.append(next_token_probs(model, b))
            p = torch.cat(probs)
            acc = (p.argmax(-1) == yes)[ok].float().mean().item() if ok.any() else float("nan")
            prob = (p[rows_, yes][ok].mean() / clean[rows_, yes][ok].mean()).item() if ok.any() else float("nan")
            rows.append({"from": src, "to": dst, "window": window, "first_layer": lo, "last_layer": hi,
                         "relative_accuracy": acc, "relative_probability": prob, "n": int(ok.sum())})
    return pd.DataFrame(rows)
