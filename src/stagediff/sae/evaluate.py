"""Held-out FVU, L0 and dead features per layer × regime × modality (paper Fig 1, Fig 6).

The un-tuned base SAE is evaluated the same way as a reference row (regime ``base``). Every
SAE sees the whole val split of the layer's cache; ``all`` pools text and image tokens (its μ is
the pooled mean, so it is not the average of the two modality FVUs).
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import torch

from stagediff.cache import ActivationStore
from stagediff.sae.finetune import heldout_batches, load_sae
from stagediff.sae.llama_scope import load_llama_scope
from stagediff.sae.metrics import evaluate

COLUMNS = ["layer", "regime", "modality", "n_tokens", "fvu", "l0", "dead_fraction"]


def evaluate_layer(store_path: str | Path, layer: int, base_sae: str | Path, k: int,
                   regime_dirs: dict[str, str | Path], base_form: str = "topk",
                   device: torch.device | str = "cpu") -> pd.DataFrame:
    """``base_form``: the base rows' encoder, TopK-k (the paper) or the release's JumpReLU. One SAE
    on ``device`` at a time (a d_sae 32768 SAE is 1.1 GB in float32)."""
    store = ActivationStore(store_path)
    loaders = {"base": (base_sae, lambda: load_llama_scope(base_sae, k=k, form=base_form, device=device)),
               **{r: (d, lambda d=d: load_sae(d, device)) for r, d in regime_dirs.items()}}
    rows = []
    for regime, (path, load) in loaders.items():
        sae = load()
        store.check_width(sae.d_model, f"{regime} SAE {path}")
        per = {m: evaluate(sae, heldout_batches(store, (m,), None, device)) for m in ("text", "image")}
        per["all"] = per["text"].merge(per["image"])
        rows += [{"layer": layer, "regime": regime, "modality": m, **s.summary()} for m, s in per.items()]
    return pd.DataFrame(rows, columns=COLUMNS)
