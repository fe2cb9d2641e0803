"""Neo et al.'s three experiments on the VLM: token ablation (Table 1), logit lens on visual tokens,
attention knockout (Table 2).

Objects come from COCO-format instances (toy world: exact boxes; paper world: COCO annotations),
one target per image chosen as Neo et al. §3 choose images: an object of ``visual.object_area``
px², the only instance of its category, in an image of at most ``visual.max_objects`` objects.
An object's name is its category name ("red circle"; COCO: "stop sign"); its class word is the
name's last word (the word the logit lens looks for). Prompts are the config's, wrapped in
``prompts.vqa``: ``visual.describe`` (generative: the name in the description), ``visual.polling``
(binary polling: next token ``yes_token``) and the VQA probe: the image's question from
``visual.questions`` (Neo et al.'s curated file) with the answer prefilled by ``visual.vqa_prefill``,
whose next token must be the class word. With ``hallucination_control`` a metric counts an object
only if it is identified in the original image and not with the object masked by noise.
"""
from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

from stagediff.data.items import Item
from stagediff.evaluate_vlm import predict
from stagediff.io import read_json
from stagediff.models.vlm import (first_token, iter_batches, last_positions, load_image, next_token_probs, to_model,
                                  token_text, visual_embeddings)
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


def load_questions(path: str | Path | None) -> dict[int, list[str]] | None:
    """Neo et al.'s question file (image id -> questions), or None with the reason logged."""
    if path is None or not Path(path).is_file():
        log.warning("VQA probe skipped: no question file (config key visual.questions = %s)", path)
        return None
    try:
        doc = read_json(Path(path))
        return {int(k): list(v) for k, v in doc.items()}
    except (ValueError, AttributeError, TypeError) as e:
        raise ValueError(f"{path}: not a question file (image id -> list of questions): {e}") from None


def object_records(coco_file: str | Path, image_dir: str | Path, cfg: dict, seed: int, grid: int,
                   pad_to_square: bool, questions: dict[int, list[str]] | None) -> list[ObjectRecord]:
    """One target object per image, for the first ``cfg["n_images"]`` images (seeded order) that
    pass Neo et al.'s filters; its VQA question is the image's first in ``questions``."""
    coco_file = Path(coco_file)
    try:
        doc = read_json(coco_file)
        cats = {c["id"]: c["name"] for c in doc["categories"]}
        images = {im["id"]: im for im in doc["images"]}
        by_image: dict[int, list] = {}
        for a in doc["annotations"]:
            by_image.setdefault(a["image_id"], []).append(a)
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"{coco_file}: not a readable COCO instances file ({e})") from None
    lo, hi = cfg["object_area"]
    out = []
    for i in np.random.default_rng(seed).permutation(sorted(images)).tolist():
        anns = by_image.get(i, [])
        if not anns or len(anns) > cfg["max_objects"]:
            continue
        names = [cats[a["category_id"]] for a in anns]
        targets = [a for a, n in zip(anns, names) if lo <= a["area"] <= hi and names.count(n) == 1
                   and n not in cfg["exclude_categories"]]
        if not targets:
            continue
        a, im = targets[0], images[i]
        name = cats[a["category_id"]]
        asked = (questions or {}).get(i, [])
        wh = (im["width"], im["height"])
        out.append(ObjectRecord(i, Path(image_dir) / im["file_name"], name, tuple(a["bbox"]), wh,
                                (asked[0], name.split()[-1]) if asked else None,
                                vt.object_patches(a["bbox"], wh, grid, pad_to_square)))
        if len(out) == cfg["n_images"]:
            break
    return sorted(out, key=lambda r: r.image_id)


def _items(records: list[ObjectRecord], texts: list[str], prompt: str, prefill: str = "") -> list[Item]:
    return [Item(r.image_id, r.image_path, prompt.format(question=t), "", (), "visual", "", "", prefill=prefill)
            for r, t in zip(records, texts)]


def _masked(records: list[ObjectRecord], folder: Path, seed: int) -> list[ObjectRecord]:
    """The records with the target object's box filled with uniform noise (Neo et al. §3 (2))."""
    rng = np.random.default_rng(seed)
    out = []
    for r in records:
        img = np.array(load_image(r.image_path))
        x, y, w, h = (int(round(v)) for v in r.box)
        img[y : y + h, x : x + w] = rng.integers(0, 256, img[y : y + h, x : x + w].shape, dtype=np.uint8)
        path = folder / f"{r.image_id}.png"
        Image.fromarray(img).save(path)
        out.append(replace(r, image_path=path))
    return out


def answer_token(tokenizer, prefill: str, word: str) -> int:
    """The first token of ``word`` as it follows ``prefill`` (" dog" after "It is a", not "dog")."""
    before = tokenizer(prefill, add_special_tokens=False)["input_ids"]
    after = tokenizer(f"{prefill} {word}" if prefill else word, add_special_tokens=False)["input_ids"]
    return after[len(before)] if after[: len(before)] == before and len(after) > len(before) else first_token(
        tokenizer, word)


def vqa_probe(records: list[ObjectRecord], cfg: dict, prompts: dict, tokenizer) -> tuple[list[Item], torch.Tensor]:
    """The VQA probe's items (answer prefilled) and the class-word token each must continue with."""
    items = _items(records, [r.vqa[0] for r in records], prompts["vqa"], cfg["vqa_prefill"])
    return items, torch.tensor([answer_token(tokenizer, cfg["vqa_prefill"], r.vqa[1]) for r in records],
                               dtype=torch.long)


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
        ig += list(integrated_gradients(model, b, torch.full((len(part),), yes), mean, cfg["ig_steps"],
                                        cfg["ig_max_rows"]).cpu())
    sets["register"] = regs
    for k in cfg["k"]:
        sets[f"int_gradients_{k}"] = [set(torch.topk(a, min(k, n_tok)).indices.tolist()) for a in ig]
        sets[f"random_{k}"] = [vt.random_tokens(n_tok, k, rng) for _ in records]
    sets["random_matched"] = [vt.random_tokens(n_tok, len(r.patches), rng) for r in records]
    return sets


def token_ablation(model, processor, records: list[ObjectRecord], sets: dict[str, list[set[int]]], cfg: dict,
                   prompts: dict, mean: torch.Tensor, seed: int) -> pd.DataFrame:
    """Table 1: per ablation type, the share (%) of objects identified before and not after."""
    tok, bs = processor.tokenizer, cfg["batch_size"]
    yes = first_token(tok, cfg["yes_token"])
    vqa_recs = [i for i, r in enumerate(records) if r.vqa]

    def outcomes(recs, chosen):
        describe = _items(recs, [cfg["describe"]] * len(recs), prompts["vqa"])
        poll = _items(recs, [cfg["polling"].format(name=r.name) for r in recs], prompts["vqa"])
        vqa, answers = vqa_probe([recs[i] for i in vqa_recs], cfg, prompts, tok)
        with replace_visual_tokens(model, list(chosen), mean):
            text = predict(model, processor, describe, bs, cfg["max_new_tokens"])
        mention = np.array([r.name in t.lower() for r, t in zip(recs, text)])
        polling = (_probs(model, processor, poll, chosen, mean, bs).argmax(-1).cpu() == yes).numpy()
        picked = [chosen[i] for i in vqa_recs]
        vqa_ok = ((_probs(model, processor, vqa, picked, mean, bs).argmax(-1).cpu() == answers).numpy()
                  if vqa_recs else np.zeros(0, bool))
        return {"generative": mention, "polling": polling, "vqa": vqa_ok}

    # predict() and _probs() run the records in order, so the projector hook sees them in order
    none = [set()] * len(records)
    clean = outcomes(records, none)
    if cfg["hallucination_control"]:  # identified only through the object's own pixels
        with tempfile.TemporaryDirectory() as tmp:
            masked = outcomes(_masked(records, Path(tmp), seed), none)
        clean = {m: ok & ~masked[m] for m, ok in clean.items()}
        log.info("hallucination control: %s objects identified in the original and not once masked",
                 {m: int(ok.sum()) for m, ok in clean.items()})
    rows = []
    for name, chosen in sets.items():
        after = outcomes(records, chosen)
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
        top = logit_lens(model, b, layers).cpu()  # [layer, batch, seq], one host copy per batch
        ids = b["input_ids"].cpu()
        for j, r in enumerate(part):
            vis = ids[j] == image_id
            grid_top = top[:, j, vis]  # [layer, n_image_tokens]
            word = first_token(tok, r.word)
            for layer in layers:
                hits = [int(grid_top[layer, p] == word) for p in sorted(r.patches)]
                rows.append({"image_id": r.image_id, "object": r.name, "layer": layer, "n_patches": len(hits),
                             "fraction": float(np.mean(hits)) if hits else float("nan")})
            if len(maps) < cfg["n_maps"] and r.image_id not in maps:
                maps[r.image_id] = {"image": str(r.image_path), "tokens": [[token_text(tok, t) for t in row]
                                                                          for row in grid_top.tolist()]}
    return pd.DataFrame(rows), maps


def knockout_table(model, processor, records: list[ObjectRecord], cfg: dict, prompts: dict, grid: int) -> pd.DataFrame:
    """Table 2: per (from, to) group pair and layer window, accuracy and probability of the correct
    answer relative to no knockout, over the objects answered correctly without it. The question is
    the object's VQA question where the world has one (the paper's setting), else binary polling."""
    tok = processor.tokenizer
    poll, yes = [], []
    for r in records:  # the VQA probe (answer prefilled) where the image has a question, else polling
        if r.vqa:
            (item,), (answer,) = vqa_probe([r], cfg, prompts, tok)
        else:
            item, answer = _items([r], [cfg["polling"].format(name=r.name)], prompts["vqa"])[0], first_token(
                tok, cfg["yes_token"])
        poll.append(item)
        yes.append(int(answer))
    image_id = model.config.image_token_id
    all_vis = set(range(grid * grid))
    groups = {("O", "LTP"): lambda r: (r.patches, None), ("O+1", "LTP"): lambda r: (vt.with_buffer(r.patches, grid, 1), None),
              ("O+2", "LTP"): lambda r: (vt.with_buffer(r.patches, grid, 2), None),
              ("I-(O+1)", "LTP"): lambda r: (all_vis - vt.with_buffer(r.patches, grid, 1), None),
              ("O+1", "LVR"): lambda r: (vt.with_buffer(r.patches, grid, 1), vt.last_row(grid)),
              ("I-LVR", "LVR"): lambda r: (all_vis - vt.last_row(grid), vt.last_row(grid))}
    batches = [(part, to_model(b, model)) for part, b in iter_batches(processor, poll, cfg["batch_size"])]
    clean = torch.cat([next_token_probs(model, b) for _, b in batches]).float().cpu()
    yes = torch.tensor(yes)
    ok = clean.argmax(-1) == yes
    rows_ = torch.arange(len(yes))
    rows = []
    for (src, dst), sel in groups.items():
        for window, (lo, hi) in cfg["windows"].items():
            probs = []
            for i, (part, b) in enumerate(batches):
                t = b["input_ids"].shape[1]
                block = torch.zeros(len(part), t, t, dtype=torch.bool)  # built on the host, moved once
                last, ids = last_positions(b).cpu(), b["input_ids"].cpu()
                for j in range(len(part)):
                    vis_pos = torch.nonzero(ids[j] == image_id).flatten()
                    frm, to = sel(records[i * cfg["batch_size"] + j])
                    keys = vis_pos[sorted(frm)] if frm else vis_pos[:0]
                    queries = vis_pos[sorted(to)] if to is not None else last[j : j + 1]
                    block[j][queries[:, None], keys[None, :]] = True
                with block_attention(model, list(range(lo, hi + 1)), block.to(b["input_ids"].device)):
                    probs.append(next_token_probs(model, b))
            p = torch.cat(probs).float().cpu()
            acc = (p.argmax(-1) == yes)[ok].float().mean().item() if ok.any() else float("nan")
            prob = (p[rows_, yes][ok].mean() / clean[rows_, yes][ok].mean()).item() if ok.any() else float("nan")
            rows.append({"from": src, "to": dst, "window": window, "first_layer": lo, "last_layer": hi,
                         "relative_accuracy": acc, "relative_probability": prob, "n": int(ok.sum())})
    return pd.DataFrame(rows)
