"""Paper Fig 2 (E_v vs decoder cosine), Fig 5 (decoder cosine vs layer per regime), Fig 7 (adapted
features per layer; mean cosine adapted vs pool) and Fig 8 (threshold sweep), PNG and PDF."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from stagediff.figures.fvu import COLORS  # noqa: E402
from stagediff.io import atomic_dir, save_figure  # noqa: E402


def diff_figures(features: pd.DataFrame, sweep: pd.DataFrame, selected: pd.DataFrame, op: tuple[float, float],
                 out_dir: str | Path) -> None:
    with atomic_dir(out_dir) as tmp:
        _fig2(features, selected, op[1], tmp)
        _fig5(features, tmp)
        _fig7(features, tmp)
        _fig8(sweep, op, tmp)


def _fig2(f: pd.DataFrame, selected: pd.DataFrame, epsilon: float, out: Path) -> None:
    """Grey: all; pink: adapted; blue squares: selected spatial/OCR features; red crosses: downstream."""
    fig, ax = plt.subplots(figsize=(5.5, 4))
    floor = epsilon / 100  # E_v = 0 drawn at the bottom of the log axis
    ev = f.visual_energy.clip(lower=floor)
    ax.scatter(f.decoder_cosine, ev, s=3, c="lightgrey", label="all features")
    a = f[f.adapted]
    ax.scatter(a.decoder_cosine, ev[f.adapted], s=6, c="hotpink", label=f"adapted ({len(a)})")
    sel_ev = selected.visual_energy.clip(lower=floor)
    ax.scatter(selected.decoder_cosine, sel_ev, s=18, marker="s", facecolors="none", edgecolors="tab:blue",
               label=f"selected ({len(selected)})")
    down = selected.downstream.astype(bool)
    ax.scatter(selected.decoder_cosine[down], sel_ev[down], s=30, marker="x", c="red",
               label=f"downstream ({int(down.sum())})")
    ax.axhline(epsilon, color="k", lw=0.5, ls="--")
    ax.set(xlabel="decoder cosine $c_f$ (base vs adapted)", ylabel="visual energy $E_v$", yscale="log")
    ax.legend(fontsize=7)
    save_figure(fig, out, "fig2_energy_vs_cosine")


def _fig5(f: pd.DataFrame, out: Path) -> None:
    fig, ax = plt.subplots(figsize=(5, 3.5))
    live = f[~f.never_fired]
    for col in [c for c in f.columns if c.startswith("decoder_cosine_")]:
        regime = col.removeprefix("decoder_cosine_")
        m = live.groupby("layer")[col].mean()
        ax.plot(m.index, m.values, marker="o", label=regime, color=COLORS.get(regime))
    ax.set(xlabel="layer", ylabel="mean decoder cosine to base", ylim=(-0.1, 1.05), xticks=sorted(f.layer.unique()))
    ax.legend(fontsize=7)
    save_figure(fig, out, "fig5_decoder_cosine_by_layer")


def _fig7(f: pd.DataFrame, out: Path) -> None:
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(8, 3.2))
    layers = sorted(f.layer.unique())
    a1.bar(layers, f.groupby("layer").adapted.sum().reindex(layers).values, color="hotpink")
    a1.set(xlabel="layer", ylabel="adapted features", title="(a) adapted count per layer", xticks=layers)
    live = f[~f.never_fired]
    a2.plot(layers, live.groupby("layer").decoder_cosine.mean().reindex(layers), marker="o", label="pool")
    a2.plot(layers, live[live.adapted].groupby("layer").decoder_cosine.mean().reindex(layers), marker="o",
            color="hotpink", label="adapted")
    a2.set(xlabel="layer", ylabel="mean decoder cosine", title="(b) adapted vs pool", xticks=layers)
    a2.legend(fontsize=7)
    save_figure(fig, out, "fig7_adapted_per_layer")


def _fig8(s: pd.DataFrame, op: tuple[float, float], out: Path) -> None:
    metrics = ("n_selected", "jaccard", "layer_count_corr")
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    eps = sorted(s.epsilon.unique())
    pcs = sorted(s.p_cos.unique())
    for ax, m in zip(axes, metrics):
        grid = s.pivot(index="epsilon", columns="p_cos", values=m).reindex(index=eps, columns=pcs)
        im = ax.imshow(grid.values, origin="lower", aspect="auto", cmap="viridis")
        ax.set_xticks(range(len(pcs)), [f"{p:g}" for p in pcs])
        ax.set_yticks(range(len(eps)), [f"{e:g}" for e in eps])
        ax.scatter([pcs.index(op[0])], [eps.index(op[1])], s=80, facecolors="white", edgecolors="k")
        ax.set(xlabel="$p_{cos}$ (%)", ylabel="ε", title=m)
        fig.colorbar(im, ax=ax)
    save_figure(fig, out, "fig8_threshold_sweep")
