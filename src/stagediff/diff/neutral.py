"""Lexical-artifact filter (paper §4.3 step 2) and the final feature selection.

For each shift candidate f of a layer: take its ``neutral.n_samples`` top-activating questions of
its split (by the largest h_f over the question's cached tokens), replace the question by each
neutral prompt ("Describe the positions of objects in the image."), run the VLM again on the same
image and read h_f at that layer. A feature survives when it still fires (max h_f over the prompt's
tokens > ``neutral.min_activation``) on at least ``neutral.min_fraction`` of those runs: it responds
to the image, not to words of the question. Every run is kept as evidence.

Selection: spatial (OCR) features = shift candidates ∩ survivors ∩ adapted set, ranked by odds
ratio; the first ``selection.top_n`` per split are what auto-interp, patching and ablation read.
"""
from __future__ import annotations

from typing import Callable

import pandas as pd
import torch

from stagediff.cache import ActivationStore
from stagediff.capture import item_residuals
from stagediff.data.items import Item
from stagediff.sae.stream import read_blocks, split_blocks

Rerun = Callable[[list[Item]], list[torch.Tensor]]
EVIDENCE_COLUMNS = ["layer", "feature", "split", "sample_id", "prompt", "act_before", "act_after", "fires_after"]


@torch.no_grad()
def max_per_sample(sae, store: ActivationStore, split: str, features: list[int]) -> pd.DataFrame:
    """[sample_id x feature] largest code of each feature over each cached question's tokens."""
    parts = []
    for m in ("text", "image"):
        ids = store.meta(m, "sample_id")
        for blk in split_blocks(store, (m,), split):  # a block at a time
            codes = sae.dense_codes(read_blocks(store, [blk], sae.device))[:, features]
            df = pd.DataFrame(codes.cpu().numpy(), columns=features).assign(sample_id=ids[blk.start : blk.stop])
            parts.append(df.groupby("sample_id").max())
    return pd.concat(parts).groupby(level=0).max()


def vlm_rerun(model, processor, layer: int, batch_size: int = 16) -> Rerun:
    """``rerun(items)``: each item's residuals at ``layer`` over its prompt tokens (no BOS, no padding)."""
    return lambda items: [h for _, _, h in item_residuals(model, processor, items, layer, batch_size)]


@torch.no_grad()
def neutral_evidence(rerun: Rerun, sae, layer: int, store: ActivationStore, items: list[Item],
                     candidates: pd.DataFrame, neutral_user_texts: list[str], cfg: dict,
                     split: str) -> pd.DataFrame:
    """One row per (candidate feature, top sample, neutral prompt).

    ``rerun`` is the VLM (``vlm_rerun``); each (sample, prompt) pair runs once, however many
    candidates share it.
    """
    if candidates.empty:
        return pd.DataFrame(columns=EVIDENCE_COLUMNS)
    by_id = {it.sample_id: it for it in items}
    before = max_per_sample(sae, store, split, sorted(set(candidates.feature)))
    runs = []  # (feature, family, sample id, act_before, neutral text)
    for c in candidates.itertuples():
        family_ids = [s for s in before.index if s in by_id and by_id[s].family == c.split]
        top = before.loc[family_ids, c.feature].nlargest(cfg["n_samples"])
        runs += [(c.feature, c.split, s, float(a), t) for s, a in top.items() for t in neutral_user_texts]
    pairs = sorted({(s, t) for _, _, s, _, t in runs})
    acts = rerun([Item(s, by_id[s].image_path, t, "", (), "neutral", "", split) for s, t in pairs])
    feats = sorted({f for f, *_ in runs})
    col = {f: j for j, f in enumerate(feats)}
    peak = torch.stack([sae.dense_codes(h)[:, feats].max(0).values for h in acts]).cpu()  # one host copy
    after = {pair: peak[r] for r, pair in enumerate(pairs)}
    rows = [{"layer": layer, "feature": f, "split": fam, "sample_id": s, "prompt": t, "act_before": a,
             "act_after": float(after[s, t][col[f]]), "fires_after": float(after[s, t][col[f]]) > cfg["min_activation"]}
            for f, fam, s, a, t in runs]
    return pd.DataFrame(rows, columns=EVIDENCE_COLUMNS)


def select_features(shift: pd.DataFrame, adapted: pd.DataFrame, evidence: pd.DataFrame, cfg: dict,
                    top_n: int) -> pd.DataFrame:
    """Candidates ∩ neutral survivors ∩ adapted, ranked by odds ratio; ``downstream`` marks the top-N."""
    survival = (evidence.groupby(["layer", "feature", "split"]).fires_after.mean()
                .rename("neutral_survival").reset_index())
    sel = (shift[shift.candidate]
           .merge(survival, on=["layer", "feature", "split"], how="left")
           .merge(adapted[["layer", "feature", "adapted", "decoder_cosine", "visual_energy"]], on=["layer", "feature"]))
    sel["survives_neutral"] = sel.neutral_survival.fillna(0) >= cfg["min_fraction"]
    sel = sel[sel.survives_neutral & sel.adapted].sort_values(["split", "odds_ratio"], ascending=[True, False])
    sel["rank"] = sel.groupby("split").cumcount() + 1
    sel["downstream"] = sel["rank"] <= top_n
    return sel.reset_index(drop=True)


def layer_candidates(shift: pd.DataFrame, adapted: pd.DataFrame, layer: int, only_adapted: bool) -> pd.DataFrame:
    """This layer's shift candidates (optionally only those already in the adapted set: cheaper)."""
    c = shift[(shift.layer == layer) & shift.candidate]
    if only_adapted:
        keep = adapted[(adapted.layer == layer) & adapted.adapted].feature
        c = c[c.feature.isin(keep)]
    return c[["feature", "split"]].reset_index(drop=True)

