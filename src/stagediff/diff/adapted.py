"""Stage-wise diffing of base vs adapted SAEs and the adapted-feature set (paper §4.2, A.1–A.4).

Per layer, one row per feature:

    decoder_cosine      c_f = cos(W_dec,f base, W_dec,f adapted), adapted = ``diff.regime`` (text)
    decoder_cosine_<r>  the same against every fine-tuned regime r (paper Fig 5)
    encoder_cosine      the same for encoder rows
    decoder_norm_ratio  ‖W_dec,f adapted‖ / ‖W_dec,f base‖
    visual_energy       E_v(f) = mean over masked held-out tokens of h_f², h_f the adapted SAE's
                        code in Llama Scope's inference form (relu(pre)·‖W_dec,f‖/s, residual units);
                        the mask is ``diff.visual_energy_tokens`` (default text: A.4 says E_v is
                        computed under a text-only mask; ``image`` is §4.2's "under vision inputs")
    firing_rate_text, firing_rate_image   share of held-out tokens with h_f > 0
    training_fires      tokens it fired on during fine-tuning; ``never_fired`` when 0 — such a
                        warm-started feature keeps c_f = 1 without having been tested, so it is
                        left out of the cosine pool instead of passing as "aligned"

Adapted set A (global, all layers together): E_v > ε and c_f in the bottom p_cos % of the pool.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch

from stagediff.cache import SPANS, ActivationStore
from stagediff.sae.finetune import heldout_batches, load_sae
from stagediff.sae.llama_scope import load_llama_scope

COS = torch.nn.functional.cosine_similarity


@torch.no_grad()
def code_stats(sae, store: ActivationStore, modality: str) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Σ h_f², #tokens with h_f > 0, and #tokens, over the held-out tokens of one modality."""
    folded = sae.folded()
    sq = torch.zeros(sae.d_sae, dtype=torch.float64, device=sae.device)
    fired = torch.zeros(sae.d_sae, dtype=torch.long, device=sae.device)
    n = 0
    for x in heldout_batches(store, (modality,), None, sae.device):
        v, i = folded.encode(x)
        on = v > 0
        sq.index_add_(0, i[on], v[on].double() ** 2)
        fired += torch.bincount(i[on], minlength=sae.d_sae)
        n += len(x)
    return sq.cpu(), fired.cpu(), n


@torch.no_grad()
def feature_table(layer: int, base_sae: str | Path, k: int, regime_dirs: dict[str, str | Path],
                  store_path: str | Path, cfg: dict, device: torch.device | str = "cpu") -> pd.DataFrame:
    """The code statistics run on ``device``; the weight comparisons on the CPU (one pass over
    d_sae x d_model, no data)."""
    base = load_llama_scope(base_sae, k=k)
    saes = {r: load_sae(d) for r, d in regime_dirs.items()}
    main = saes[cfg["regime"]]
    store = ActivationStore(store_path)
    on_device = load_sae(regime_dirs[cfg["regime"]], device)
    stats = {m: code_stats(on_device, store, m) for m in ("text", "image")}
    masks = SPANS[cfg["visual_energy_tokens"]]
    energy = sum(stats[m][0] for m in masks) / max(1, sum(stats[m][2] for m in masks))
    fires = pd.read_parquet(Path(regime_dirs[cfg["regime"]]) / "features.parquet")["training_fires"].to_numpy()
    table = {"layer": layer, "feature": np.arange(base.d_sae),
             "decoder_cosine": COS(base.W_dec, main.W_dec, dim=1).numpy(),
             "encoder_cosine": COS(base.W_enc, main.W_enc, dim=1).numpy(),
             "decoder_norm_ratio": (main.W_dec.norm(dim=1) / base.W_dec.norm(dim=1)).numpy(),  # same s in both
             "visual_energy": energy.numpy(),
             "firing_rate_text": (stats["text"][1] / max(1, stats["text"][2])).numpy(),
             "firing_rate_image": (stats["image"][1] / max(1, stats["image"][2])).numpy(),
             "training_fires": fires, "never_fired": fires == 0}
    for r, sae in saes.items():
        table[f"decoder_cosine_{r}"] = COS(base.W_dec, sae.W_dec, dim=1).numpy()
    return pd.DataFrame(table)


def adapted_mask(table: pd.DataFrame, p_cos: float, epsilon: float) -> pd.Series:
    """E_v > ε and c_f at or below the p_cos-th percentile of the pool (features that fired)."""
    pool = ~table.never_fired
    cut = np.percentile(table.decoder_cosine[pool], p_cos)
    return pool & (table.visual_energy > epsilon) & (table.decoder_cosine <= cut)


def threshold_sweep(table: pd.DataFrame, p_cos_grid: list[float], eps_grid: list[float], p_cos: float,
                    epsilon: float) -> pd.DataFrame:
    """Per (p_cos, ε): selected count, Jaccard with the operating point, per-layer count correlation."""
    ref = adapted_mask(table, p_cos, epsilon)
    ref_counts = ref.groupby(table.layer).sum()
    rows = []
    for p in p_cos_grid:
        for e in eps_grid:
            sel = adapted_mask(table, p, e)
            union = int((sel | ref).sum())
            counts = sel.groupby(table.layer).sum()
            corr = (np.corrcoef(counts, ref_counts)[0, 1]
                    if counts.std() > 0 and ref_counts.std() > 0 else float("nan"))
            rows.append({"p_cos": p, "epsilon": e, "n_selected": int(sel.sum()),
                         "jaccard": int((sel & ref).sum()) / union if union else float("nan"),
                         "layer_count_corr": corr})
    return pd.DataFrame(rows)
