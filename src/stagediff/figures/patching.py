"""Attribution-patching figures: Fig 13 (layer curves), Fig 14 (head maps), Fig 15/16 (attention
overlays of the top and bottom heads on a feature's top samples) and head recurrence across
features (the idea of Fig 4). Scores are |Method A| and |Method B| averaged over samples."""
from __future__ import annotations

from pathlib import Path

import h5py
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from stagediff.autointerp.prompts import overlay  # noqa: E402
from stagediff.io import atomic_dir, save_figure  # noqa: E402
from stagediff.models.vlm import model_view  # noqa: E402

METHODS = {"method_b": "Method B", "method_a": "Method A"}


def patching_figures(scores: pd.DataFrame, dirs: list[str | Path], cfg: dict, out_dir: str | Path,
                     pad_to_square: bool = False) -> None:
    with atomic_dir(out_dir) as tmp:
        if scores.empty:
            return
        _fig13(scores, tmp)
        _fig14(scores, tmp)
        _recurrence(scores, cfg["figure_top_heads"], tmp)
        for d in dirs:
            for h5 in sorted(Path(d).glob("feature_*.h5")):
                _overlays(scores, h5, cfg["figure_top_heads"], tmp, pad_to_square)


def _head_scores(t: pd.DataFrame, method: str) -> pd.Series:
    """|score| per (src_layer, query head) from the q and o views (key heads are shared: see Fig 14)."""
    q = t[t.view.isin(["q", "o"])]
    return q.assign(s=q[method].abs()).groupby(["src_layer", "head"]).s.sum()


def _fig13(scores: pd.DataFrame, out: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4), sharey=True)
    for ax, (m, title) in zip(axes, METHODS.items()):
        # each feature's share of |attribution| per source layer, computed once for its line and the mean
        per = scores.assign(s=scores[m].abs()).groupby(["layer", "feature", "src_layer"]).s.sum()
        total = per.groupby(level=[0, 1]).transform("sum")
        share = per / total.clip(lower=1e-12)
        for _, line in share.groupby(level=[0, 1]):
            ax.plot(line.index.get_level_values(2), line, color="grey", lw=0.6, alpha=0.6)
        mean = share.where(total > 0).groupby(level=2).mean()  # features with no attribution left out
        ax.plot(mean.index, mean, color="tab:red", lw=2, label="mean over features")
        ax.set(title=f"{title}", xlabel="layer")
    axes[0].set_ylabel("share of |attribution|")
    axes[0].legend(fontsize=7)
    save_figure(fig, out, "fig13_layer_attribution")


def _fig14(scores: pd.DataFrame, out: Path) -> None:
    views = ["q", "k", "o"]
    fig, axes = plt.subplots(2, 3, figsize=(10, 5.5))
    for r, (m, title) in enumerate(METHODS.items()):
        for c, view in enumerate(views):
            t = scores[scores.view == view].assign(s=lambda d: d[m].abs())
            grid = t.groupby(["src_layer", "head"]).s.mean().unstack("head")
            im = axes[r, c].imshow(grid.to_numpy(), aspect="auto", cmap="viridis")
            axes[r, c].set(title=f"{title}: {view}" + (" (key heads)" if view == "k" else ""), xlabel="head",
                           ylabel="layer")
            fig.colorbar(im, ax=axes[r, c])
    save_figure(fig, out, "fig14_head_attribution")


def _recurrence(scores: pd.DataFrame, n: int, out: Path) -> None:
    """How many features have each head among their top-n by |Method B| (Fig 4's recurring heads)."""
    counts = {}
    for _, t in scores.groupby(["layer", "feature"]):
        for key in _head_scores(t, "method_b").nlargest(n).index:
            counts[key] = counts.get(key, 0) + 1
    top = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:20]
    fig, ax = plt.subplots(figsize=(7, 3))
    ax.bar([f"L{l}H{h}" for (l, h), _ in top], [c for _, c in top], color="tab:purple")
    ax.set(ylabel="features", title=f"heads in a feature's top {n} (Method B)")
    ax.tick_params(axis="x", rotation=60, labelsize=7)
    save_figure(fig, out, "fig4_head_recurrence")


def _overlays(scores: pd.DataFrame, h5: Path, n: int, out: Path, pad_to_square: bool) -> None:
    with h5py.File(h5) as f:
        layer, feature = int(f.attrs["layer"]), int(f.attrs["feature"])
        att = f["attention_to_image"][:]  # [sample, layer, head, patch]
        images = [p.decode() if isinstance(p, bytes) else p for p in f["image"][:]]
    ranked = _head_scores(scores[(scores.layer == layer) & (scores.feature == feature)], "method_b")
    ranked = ranked.sort_values(ascending=False, kind="stable")
    for name, heads in (("fig15_top_heads", ranked.index[:n]), ("fig16_bottom_heads", ranked.index[::-1][:n])):
        fig, axes = plt.subplots(len(heads), len(images), figsize=(1.8 * len(images), 1.9 * len(heads)), squeeze=False)
        for r, (src, h) in enumerate(heads):
            for c, path in enumerate(images):
                axes[r, c].imshow(overlay(model_view(path, pad_to_square), att[c, src, h].tolist()))
                axes[r, c].set_xticks([])
                axes[r, c].set_yticks([])
            axes[r, 0].set_ylabel(f"L{src}H{h}", fontsize=8)
        fig.suptitle(f"L{layer} feature {feature}: {'top' if 'top' in name else 'bottom'} heads by |Method B|, "
                     "attention from text to image patches", fontsize=8)
        save_figure(fig, out, f"{name}_L{layer}_f{feature}")
