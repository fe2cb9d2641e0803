"""Distribution shift: which features a spatial (or OCR) split recruits (paper §4.3, A.5, A.6).

For a set of questions D, the token-level firing frequency of feature f is

    p_f(D) = (1 / n(D)) Σ_{x∈D} Σ_t 1{h_f(x_t) > 0},   n(D) = tokens of D

(the paper's formula; which tokens count is ``shift.tokens``). Each split (questions matching the
``question_splits`` keywords) is compared with the base = every question of the held-out split:

    delta_p     p_f(split) − p_f(base)
    odds_ratio  (a/b)/(c/d) with a, b = split tokens where f fires / does not, c, d = the same for
                the base; +0.5 in every cell (Haldane–Anscombe), so a feature silent in one split
                still has a finite OR; 95 % CI by Woolf's method, exp(ln OR ± 1.96·√(1/a+1/b+1/c+1/d))
    p_value     Fisher's exact test of split vs the *rest* of the base (a test needs disjoint
                groups; the split is inside the base), two-sided; ``p_adjusted`` corrects over every
                feature × layer of a split (Benjamini–Hochberg by default)
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from scipy import stats

from stagediff.cache import ActivationStore
from stagediff.data.items import Item
from stagediff.sae.stream import read_blocks, split_blocks

Z95 = 1.959963984540054


def odds_ratio(a, b, c, d) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(OR, CI low, CI high) with 0.5 added to every cell; arrays broadcast."""
    a, b, c, d = (np.asarray(v, dtype=np.float64) + 0.5 for v in (a, b, c, d))
    log_or = np.log(a * d / (b * c))
    half = Z95 * np.sqrt(1 / a + 1 / b + 1 / c + 1 / d)
    return np.exp(log_or), np.exp(log_or - half), np.exp(log_or + half)


def fisher_p(a, b, c, d) -> np.ndarray:
    return np.array([stats.fisher_exact([[int(w), int(x)], [int(y), int(z)]])[1]
                     for w, x, y, z in zip(a, b, c, d)])


@torch.no_grad()
def firing_counts(sae, store: ActivationStore, modalities: tuple[str, ...], split: str,
                  groups: dict[str, set[int]]) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """Per group of sample ids: tokens on which each feature fires, and the group's token count."""
    fired = {g: torch.zeros(sae.d_sae, dtype=torch.long, device=sae.device) for g in groups}
    n = {g: 0 for g in groups}
    for m in modalities:
        lo, hi = store.split_rows(m, split)
        ids = store.meta(m, "sample_id")[lo:hi]
        member = {g: np.isin(ids, list(s)) for g, s in groups.items()}  # host masks: counts without a sync
        for blk in split_blocks(store, (m,), split):
            v, i = sae.encode(read_blocks(store, [blk], sae.device))
            for g, mask in member.items():
                sel = mask[blk.start - lo : blk.stop - lo]
                rows = torch.from_numpy(sel).to(sae.device)
                fired[g] += torch.bincount(i[rows][v[rows] > 0], minlength=sae.d_sae)
                n[g] += int(sel.sum())
    return {g: f.cpu().numpy() for g, f in fired.items()}, n


def shift_table(layer: int, sae, store: ActivationStore, items: list[Item], split: str,
                families: list[str], modalities: tuple[str, ...]) -> pd.DataFrame:
    """One row per feature × family (e.g. spatial, ocr): the shift statistics against the base."""
    groups = {"base": {it.sample_id for it in items}}
    groups |= {f: {it.sample_id for it in items if it.family == f} for f in families}
    groups |= {f"rest_{f}": groups["base"] - groups[f] for f in families}
    fired, n = firing_counts(sae, store, modalities, split, groups)
    rows = []
    for f in families:
        a, c = fired[f], fired["base"]
        b, d = n[f] - a, n["base"] - c
        ratio, lo, hi = odds_ratio(a, b, c, d)
        r = fired[f"rest_{f}"]
        rows.append(pd.DataFrame({
            "layer": layer, "feature": np.arange(sae.d_sae), "split": f,
            "n_tokens_split": n[f], "n_tokens_base": n["base"],
            "p_split": a / max(n[f], 1), "p_base": c / max(n["base"], 1),
            "delta_p": a / max(n[f], 1) - c / max(n["base"], 1),
            "odds_ratio": ratio, "or_ci_low": lo, "or_ci_high": hi,
            "p_value": fisher_p(a, b, r, n[f"rest_{f}"] - r)}))
    return pd.concat(rows, ignore_index=True)


def mark_candidates(table: pd.DataFrame, cfg: dict) -> pd.DataFrame:
    """Multiple-comparison correction per split over all layers, then the candidate flag."""
    table = table.copy()
    table["p_adjusted"] = np.nan
    for _, idx in table.groupby("split").groups.items():
        p = table.loc[idx, "p_value"].to_numpy()
        table.loc[idx, "p_adjusted"] = (np.minimum(p * len(p), 1.0) if cfg["correction"] == "bonferroni"
                                        else stats.false_discovery_control(p, method="bh"))
    table["candidate"] = ((table.delta_p > cfg["min_delta_p"]) & (table.or_ci_low > cfg["min_odds_ratio"])
                          & (table.p_adjusted <= cfg["alpha"]))
    return table
