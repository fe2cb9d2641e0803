"""Examples for auto-interp (paper A.8 step 1): per selected feature of a layer, its top-activating
samples, held-out positives for validation and random VQA negatives.

The pool is general VQA, spatial VQA and VSR items of one split (``autointerp.pool``). The VLM
runs once over the pool; every feature of the layer is read from the same forward. Examples are
deduplicated by image across the three sources, so the k samples the explainer sees show k
different images. Per example: the prompt's text tokens with their activations, and the
activation over image patches (the OVERLAY heatmap until head overlays exist).
"""
from __future__ import annotations

import random

import numpy as np
import torch

from stagediff.capture import item_residuals
from stagediff.data.items import Item
from stagediff.models.vlm import token_text

CONTRAST = 20  # random prompts the offline explainer contrasts with; disjoint from the negatives


def pool_activations(model, processor, sae, layer: int, items: list[Item], features: list[int],
                     batch_size: int = 16) -> list[dict]:
    """Per pool item: its text tokens, and every feature's activations on text tokens and image patches."""
    image_id = model.config.image_token_id
    out = []
    with torch.no_grad():
        for it, ids, h in item_residuals(model, processor, items, layer, batch_size):
            codes = sae.dense_codes(h)[:, features].cpu()  # [tokens, features]
            is_image = ids == image_id
            out.append({"item": it,
                        "tokens": [token_text(processor.tokenizer, int(t)) for t in ids[~is_image]],
                        "text_acts": codes[~is_image].T.numpy(), "image_acts": codes[is_image].T.numpy()})
    return out


def peak_activation(row: dict, j: int) -> float:
    """Feature ``j``'s largest activation over a pool item's text tokens and image patches (0 if silent)."""
    return float(max(row["text_acts"][j].max(initial=0.0), row["image_acts"][j].max(initial=0.0)))


def _example(row: dict, j: int) -> dict:
    it = row["item"]
    text, image = row["text_acts"][j], row["image_acts"][j]
    return {"sample_id": int(it.sample_id), "source": "vsr" if it.family == "vsr" else "vqav2",
            "family": it.family, "image": str(it.image_path), "prompt": it.user_text,
            "tokens": row["tokens"], "activations": [round(float(a), 5) for a in text],
            "image_activations": [round(float(a), 5) for a in image],
            "max_activation": peak_activation(row, j)}


def feature_examples(rows: list[dict], j: int, cfg: dict, seed: int) -> dict:
    """Feature ``j`` of the pool: top-k positives, held-out positives, random VQA negatives (and a
    separate random contrast set, which only the offline explainer reads).

    Negatives are random VQA samples on images that are not among the positives shown or held out,
    as the paper's "random VQA negatives"; they may fire weakly (their ``max_activation`` is kept),
    so the validation asks whether the description picks out the *top* activations.
    """
    peak = np.array([peak_activation(r, j) for r in rows])
    seen, positives = set(), []
    n_pos = cfg["top_k"] + cfg["n_heldout"] * cfg["rounds"]
    for i in np.argsort(-peak, kind="stable"):
        if peak[i] <= 0 or len(positives) == n_pos:
            break
        if rows[i]["item"].image_path not in seen:  # dedup across general VQA, spatial VQA and VSR
            seen.add(rows[i]["item"].image_path)
            positives.append(_example(rows[i], j))
    others = [i for i, r in enumerate(rows) if r["item"].family != "vsr" and r["item"].image_path not in seen]
    n_neg = cfg["n_heldout"] * cfg["rounds"] * cfg["negative_ratio"]
    drawn = random.Random(seed).sample(others, min(len(others), n_neg + CONTRAST))
    return {"top": positives[: cfg["top_k"]], "heldout": positives[cfg["top_k"]:],
            "negatives": [_example(rows[i], j) for i in drawn[:n_neg]],
            "contrast": [_example(rows[i], j) for i in drawn[n_neg:]]}


def layer_examples(model, processor, sae, layer: int, selected, items: list[Item], cfg: dict, seed: int) -> dict:
    """Examples for the layer's downstream features (``selected``: the selection table)."""
    mine = selected[(selected.layer == layer) & selected.downstream]
    splits = mine.groupby("feature").split.apply(lambda s: sorted(set(s)))
    if splits.empty:
        return {"layer": layer, "features": []}
    rows = pool_activations(model, processor, sae, layer, items, [int(f) for f in splits.index])
    return {"layer": layer, "features": [{"feature": int(f), "splits": sp, **feature_examples(rows, j, cfg, seed + int(f))}
                                         for j, (f, sp) in enumerate(splits.items())]}
