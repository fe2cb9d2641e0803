"""Paper Fig 9 (spatial) and Fig 10 (OCR): firing frequency in the split vs the base, and the
candidate scatter (Δp_f against the odds ratio), PNG and PDF."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from stagediff.io import atomic_dir, save_figure  # noqa: E402

FIGURES = {"spatial": "fig9_spatial_shift", "ocr": "fig10_ocr_shift"}


def shift_figures(table: pd.DataFrame, out_dir: str | Path) -> None:
    with atomic_dir(out_dir) as tmp:
        for split, t in table.groupby("split"):
            _figure(t, split, tmp, FIGURES.get(split, f"shift_{split}"))


def _figure(t: pd.DataFrame, split: str, out: Path, name: str) -> None:
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.6))
    pos = np.concatenate([t.p_base[t.p_base > 0], t.p_split[t.p_split > 0]])
    lo = max(pos.min() / 2, 1e-7) if len(pos) else 1e-4  # p_f = 0 is drawn at the axis floor
    a1.scatter(t.p_base.clip(lower=lo), t.p_split.clip(lower=lo), s=3, c="lightgrey")
    c = t[t.candidate]
    a1.scatter(c.p_base.clip(lower=lo), c.p_split.clip(lower=lo), s=8, c="tab:blue", marker="s",
               label=f"candidates ({len(c)})")
    a1.plot([lo, 1], [lo, 1], "k--", lw=0.5)
    a1.set(xscale="log", yscale="log", xlabel="$p_f$ base", ylabel=f"$p_f$ {split}",
           title="(a) token firing frequency")
    a1.legend(fontsize=7)
    a2.scatter(t.delta_p, np.log2(t.odds_ratio), s=3, c="lightgrey")
    a2.scatter(c.delta_p, np.log2(c.odds_ratio), s=8, c="tab:blue", marker="s")
    a2.axhline(0, color="k", lw=0.5)
    a2.set(xlabel=r"$\Delta p_f$", ylabel=r"$\log_2$ odds ratio", title="(b) candidates")
    save_figure(fig, out, name)
