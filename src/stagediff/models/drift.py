"""How far visual instruction tuning moved the LM: the VLM's LM against its base LM on text only.

Model diffing assumes the adapted LM stays close to its base (LLaVA-MORE tunes Llama-3.1 at lr
2e-5); a toy VLM whose LM drifted far makes every base SAE a poor fit and every feature look
"adapted". Per layer, on the same text-only lines through both models (no image, the base LM's
own tokenizer): the mean residual norm of each, their ratio (VLM / base) and the mean per-token
cosine between the two residuals. BOS is left out: its residual is an outlier in both.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import torch
from transformers import AutoTokenizer, LlamaForCausalLM

from stagediff.capture import capture_residuals
from stagediff.models.vlm import load_vlm


def lm_drift(base_lm: str | Path, vlm: str | Path, lines: list[str], layers: list[int]) -> pd.DataFrame:
    tokenizer = AutoTokenizer.from_pretrained(base_lm)
    base = LlamaForCausalLM.from_pretrained(base_lm, use_safetensors=True).eval()
    return drift_table(base, load_vlm(vlm)[0], tokenizer, lines, layers)


@torch.no_grad()
def drift_table(base, adapted, tokenizer, lines: list[str], layers: list[int]) -> pd.DataFrame:
    """``lm_drift`` on models already loaded (``adapted`` a VLM or a causal LM, in eval mode)."""
    sums = {L: torch.zeros(3, dtype=torch.float64) for L in layers}  # base norm, VLM norm, cosine
    n = 0
    for line in lines:
        ids = tokenizer(line, return_tensors="pt", add_special_tokens=True)["input_ids"]
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        a, b = capture_residuals(base, batch, layers), capture_residuals(adapted, batch, layers)
        keep = ids[0] != tokenizer.bos_token_id
        for L in layers:
            x, y = a[L][0, keep].double(), b[L][0, keep].double()
            sums[L] += torch.stack([x.norm(dim=-1).sum(), y.norm(dim=-1).sum(),
                                    torch.nn.functional.cosine_similarity(x, y, dim=-1).sum()])
        n += int(keep.sum())
    rows = []
    for L in layers:
        base_norm, vlm_norm, cos = (sums[L] / n).tolist()
        rows.append({"layer": L, "n_tokens": n, "base_norm": base_norm, "vlm_norm": vlm_norm,
                     "norm_ratio": vlm_norm / base_norm, "cosine": cos})
    return pd.DataFrame(rows)
