"""Paper Fig 1 (mean held-out FVU across layers per regime + summary table) and Fig 6
(per-layer FVU convergence per regime), PNG and PDF, from the SAE curves and the FVU table.

A regime is judged on the span it trains on: text on text tokens, image on image tokens,
full and random on all tokens. The base SAE (no tuning) is the reference on all tokens.
"""
from __future__ import annotations

from pathlib import Path

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from stagediff.io import atomic_dir, read_json, save_figure, write_parquet  # noqa: E402

TOKENS = matplotlib.ticker.EngFormatter()  # 120k, 30M: readable tick labels at any scale
OWN_SPAN = {"base": "all", "full": "all", "image": "image", "text": "text", "random": "all"}
COLORS = {"full": "tab:blue", "image": "tab:orange", "text": "tab:green", "random": "tab:red"}


def load_curves(sae_dirs: list[str | Path]) -> pd.DataFrame:
    parts = []
    for d in sae_dirs:
        meta = read_json(Path(d) / "cfg.json")
        c = pd.read_parquet(Path(d) / "curve.parquet")
        parts.append(c.assign(layer=meta["layer"], regime=meta["regime"]))
    return pd.concat(parts, ignore_index=True)


def summary_table(table: pd.DataFrame) -> pd.DataFrame:
    """Per regime, over layers: mean/std/min/max of held-out FVU on its own span."""
    own = table[table.modality == table.regime.map(OWN_SPAN)]
    s = own.groupby("regime", sort=False).fvu.agg(["mean", "std", "min", "max"]).reset_index()
    s.insert(1, "span", s.regime.map(OWN_SPAN))
    s.insert(2, "n_layers", own.groupby("regime", sort=False).layer.nunique().values)
    return s


def fvu_figures(table_path: str | Path, sae_dirs: list[str | Path], out_dir: str | Path) -> None:
    table, curves = pd.read_parquet(table_path), load_curves(sae_dirs)
    summary = summary_table(table)
    with atomic_dir(out_dir) as tmp:
        _fig1(curves, summary, tmp)
        _fig6(curves, tmp)
        write_parquet(summary, Path(tmp) / "fvu_summary.parquet")


def _fig1(curves: pd.DataFrame, summary: pd.DataFrame, out: Path) -> None:
    fig, (ax, tab) = plt.subplots(2, 1, figsize=(6, 6), gridspec_kw={"height_ratios": [3, 1.4]})
    for regime, c in curves.groupby("regime", sort=False):
        m = c.groupby("tokens_seen").fvu.mean()
        ax.plot(m.index, m.values, label=regime, color=COLORS.get(regime))
    ax.set(xlabel="tokens seen", ylabel="held-out FVU (mean over layers)", yscale="log",
           title="SAE adaptation: mean FVU across layers")
    ax.xaxis.set_major_formatter(TOKENS)
    ax.legend()
    tab.axis("off")
    cells = [[r.regime, r.span, f"{r.mean:.4f}", f"{r.std:.4f}", f"{r.min:.4f}", f"{r.max:.4f}"]
             for r in summary.itertuples()]
    t = tab.table(cellText=cells, colLabels=["regime", "span", "mean", "std", "min", "max"], loc="center")
    best = int(summary["mean"].idxmin())
    for col in range(6):  # the lowest mean in bold, as the paper's table
        t[best + 1, col].set_text_props(fontweight="bold")
    save_figure(fig, out, "fig1_fvu")


def _fig6(curves: pd.DataFrame, out: Path) -> None:
    layers = sorted(curves.layer.unique())
    cols = min(4, len(layers))
    rows = -(-len(layers) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False, sharey=True)
    for ax, layer in zip(axes.flat, layers):
        for regime, c in curves[curves.layer == layer].groupby("regime", sort=False):
            ax.plot(c.tokens_seen, c.fvu, label=regime, color=COLORS.get(regime))
        ax.set(title=f"layer {layer}", xlabel="tokens seen", yscale="log")
        ax.xaxis.set_major_formatter(TOKENS)
    for ax in axes.flat[len(layers):]:
        ax.axis("off")
    axes[0, 0].set_ylabel("held-out FVU")
    axes[0, 0].legend(fontsize=7)
    save_figure(fig, out, "fig6_fvu_per_layer")
