"""Attribution patching for one layer's downstream features: scores, validation, dense tensors.

Per feature: its ``patching.top_k`` top-activating held-out VQA questions (largest code over the
cached tokens), Method A and B per head and view averaged over them, optionally the exact
activation-patching effects (``patching.exact``) with their rank agreement and cost, and an HDF5
file with the per-sample tensors: attributions [sample, layer, head] per view and method, and each
head's attention from the text positions to every image patch [sample, layer, head, patch].
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import torch
from scipy import stats

from stagediff.cache import ActivationStore
from stagediff.data.items import Item
from stagediff.diff.neutral import max_per_sample
from stagediff.io import atomic_dir
from stagediff.models.vlm import eager_attention, iter_batches, to_model, token_masks
from stagediff.patching.attribution import attribution, exact_effects, unit_direction
from stagediff.patching.heads import VIEWS, query_heads

log = logging.getLogger(__name__)
SCORE_COLUMNS = ["layer", "feature", "src_layer", "view", "head", "query_heads", "method_a", "method_b", "exact"]
AGREEMENT = [f"{k}_{m}" for m in ("a", "b") for k in ("spearman", "spearman_top", "top_overlap")]


def validation_columns(cfg: dict) -> list[str]:
    return ["layer", "feature", "n_samples", "n_units", "j_clean", "j_corrupt"] + (AGREEMENT if cfg["exact"] else [])


@torch.no_grad()
def image_attention(model, batch: dict, layers: list[int]) -> np.ndarray:
    """[batch, layer, head, image patch]: each head's attention from the text positions (mean) to
    every image token, from an eager-attention forward (the weights SDPA never materialises)."""
    with eager_attention(model):
        att = model(**batch, output_attentions=True, use_cache=False).attentions
    image, text = token_masks(batch, model)
    w = text.float() / text.sum(1, keepdim=True).clamp(min=1)  # [batch, seq] mean over text queries
    out = []
    for layer in layers:
        a = torch.einsum("bq,bhqk->bhk", w, att[layer].float())  # [batch, heads, seq]
        out.append(torch.stack([a[i][:, image[i]] for i in range(len(a))]))
    return torch.stack(out, 1).cpu().numpy()


def _to_host(scores):
    """A (nested dict of) device tensor(s) on the CPU: one copy each, then per-head reads are free."""
    return {k: _to_host(v) for k, v in scores.items()} if isinstance(scores, dict) else scores.cpu()


def rank_agreement(score: np.ndarray, exact: np.ndarray, top: int) -> dict:
    """Spearman over all units and over the ``top`` units by |exact|; top-``top`` overlap by |.|."""
    top_exact = np.argsort(-np.abs(exact), kind="stable")[:top]
    top_score = np.argsort(-np.abs(score), kind="stable")[:top]
    return {"spearman": float(stats.spearmanr(score, exact)[0]),
            "spearman_top": float(stats.spearmanr(score[top_exact], exact[top_exact])[0]),
            "top_overlap": len(set(top_exact) & set(top_score)) / top}


def feature_patching(model, processor, items: list[Item], layer: int, feature: int, v: torch.Tensor,
                     mean: torch.Tensor, cfg: dict, h5_path: Path) -> tuple[pd.DataFrame, dict]:
    (_, b), = iter_batches(processor, items, len(items))
    b = to_model(b, model)
    t0 = time.perf_counter()
    attr = _to_host(attribution(model, b, layer, v, mean, cfg["positions"]))
    t_attr = time.perf_counter() - t0
    exact, t_exact = None, float("nan")
    if cfg["exact"]:
        t0 = time.perf_counter()
        exact = _to_host(exact_effects(model, b, layer, v, mean, cfg["positions"]))
        t_exact = time.perf_counter() - t0
    rows = []
    for (src, view), a in attr["method_a"].items():
        bm = attr["method_b"][src, view]
        for h in range(a.shape[1]):
            rows.append({"layer": layer, "feature": feature, "src_layer": src, "view": view, "head": h,
                         "query_heads": ",".join(map(str, query_heads(model, h))) if view == "k" else str(h),
                         "method_a": float(a[:, h].mean()), "method_b": float(bm[:, h].mean()),
                         "exact": float(exact[src, view][:, h].mean()) if exact else float("nan")})
    table = pd.DataFrame(rows, columns=SCORE_COLUMNS)
    # wall times go to the log, not the table: same config, same tables (benchmarks/bench_patching.py
    # measures the cost ratio side by side)
    log.info("layer %d feature %d: attribution %.3fs, exact %.3fs (%.1fx)", layer, feature, t_attr, t_exact,
             t_exact / t_attr)
    val = {"layer": layer, "feature": feature, "n_samples": len(items), "n_units": len(table),
           "j_clean": float(attr["j_clean"].mean()), "j_corrupt": float(attr["j_corr"].mean())}
    if exact:
        top = min(cfg["validate_top"], len(table))
        for m, score in (("a", table.method_a.to_numpy()), ("b", -table.method_b.to_numpy())):
            val |= {f"{k}_{m}": x for k, x in rank_agreement(score, table.exact.to_numpy(), top).items()}
    layers = list(range(layer + 1))
    with h5py.File(h5_path, "w") as f:
        f.attrs.update({"layer": layer, "feature": feature, "objective": f"mean over {cfg['positions']} positions "
                        "of the layer residual . unit decoder direction", "corruption": "mean visual embedding"})
        f.create_dataset("sample_id", data=np.array([it.sample_id for it in items]))
        f.create_dataset("image", data=[str(it.image_path) for it in items], dtype=h5py.string_dtype())
        for method in ("method_a", "method_b"):
            for view in VIEWS:
                d = f.create_dataset(f"{method}/{view}", data=np.stack(
                    [attr[method][src, view].numpy() for src in layers], 1))
                d.attrs["axes"] = "sample, layer, head" + (" (key/value head: grouped-query attention)" if view == "k" else "")
        if exact:
            for view in VIEWS:
                f.create_dataset(f"exact/{view}", data=np.stack([exact[src, view].numpy() for src in layers], 1))
        att = f.create_dataset("attention_to_image", data=image_attention(model, b, layers))
        att.attrs["axes"] = "sample, layer, query head, image patch (row-major grid)"
    return table, val


def patching_layer(model, processor, sae, layer: int, store: ActivationStore, items: list[Item],
                   selected: pd.DataFrame, mean: torch.Tensor, cfg: dict, split: str,
                   out_dir: str | Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Head scores and validation rows for the layer's downstream features; HDF5 files in ``out_dir``."""
    feats = sorted({int(f) for f in selected[(selected.layer == layer) & selected.downstream].feature})
    by_id = {it.sample_id: it for it in items}
    tables, vals = [], []
    with atomic_dir(out_dir) as tmp:
        if feats:
            best = max_per_sample(sae, store, split, feats)
            best = best[best.index.isin(list(by_id))]
            for f in feats:
                top = [by_id[s] for s in best[f].nlargest(cfg["top_k"]).index]
                t, v = feature_patching(model, processor, top, layer, f, unit_direction(sae, f), mean, cfg,
                                        Path(tmp) / f"feature_{f}.h5")
                log.info("layer %d feature %d: Spearman A %.2f, -B %.2f", layer, f, v.get("spearman_a", np.nan),
                         v.get("spearman_b", np.nan))
                tables.append(t)
                vals.append(v)
    return (pd.concat(tables, ignore_index=True) if tables else pd.DataFrame(columns=SCORE_COLUMNS),
            pd.DataFrame(vals, columns=validation_columns(cfg)))
