"""Figures for Neo et al.'s experiments: token-ablation decreases (their Table 1), the logit-lens
class-word share per layer with per-image patch maps, and attention-knockout ratios (their Table 2),
PNG and PDF, plus both tables as Markdown."""
from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from stagediff.io import atomic_dir, markdown_table, save_figure  # noqa: E402
from stagediff.models.vlm import model_view  # noqa: E402

METRICS = ("generative", "polling", "vqa")


def visual_figures(ablation: pd.DataFrame, lens: pd.DataFrame, maps: dict, knockout: pd.DataFrame,
                   out_dir: str | Path, pad_to_square: bool = False) -> None:
    with atomic_dir(out_dir) as tmp:
        _ablation(ablation, tmp)
        _lens(lens, maps, tmp, pad_to_square)
        _knockout(knockout, tmp)


def _ablation(t: pd.DataFrame, out: Path) -> None:
    fig, ax = plt.subplots(figsize=(9, 3.5))
    w = 0.27
    for i, m in enumerate(METRICS):
        ax.bar([x + (i - 1) * w for x in range(len(t))], t[f"{m}_decrease_pct"], w, label=m)
    ax.set_xticks(range(len(t)), [f"{a}\n({n:.1f})" for a, n in zip(t.ablation, t.avg_tokens)], fontsize=6)
    ax.set(ylabel="decrease (%)", title="token ablation (Neo et al. Table 1); avg tokens in brackets")
    ax.legend(fontsize=7)
    save_figure(fig, out, "neo_table1_token_ablation")
    (out / "neo_table1_token_ablation.md").write_text(markdown_table(t) + "\n")


def _lens(t: pd.DataFrame, maps: dict, out: Path, pad_to_square: bool) -> None:
    per = t.groupby("layer").fraction.agg(["mean", "sem"])
    fig, ax = plt.subplots(figsize=(4.5, 3))
    ax.errorbar(per.index, per["mean"], yerr=per["sem"].fillna(0), marker="o")
    ax.set(xlabel="layer", ylabel="object patches → class word", title="logit lens on visual tokens")
    save_figure(fig, out, "neo_logit_lens_fraction")
    best = int(per["mean"].idxmax()) if per["mean"].notna().any() else 0
    for image_id, m in maps.items():
        tokens = m["tokens"][best]
        side = math.isqrt(len(tokens))
        fig, ax = plt.subplots(figsize=(4, 4))
        img = model_view(m["image"], pad_to_square)
        ax.imshow(img)
        cw, ch = img.size[0] / side, img.size[1] / side
        for i, tok in enumerate(tokens[: side * side]):
            r, c = divmod(i, side)
            ax.text((c + 0.5) * cw, (r + 0.5) * ch, tok, ha="center", va="center", fontsize=6,
                    bbox={"facecolor": "white", "alpha": 0.6, "pad": 0.5, "linewidth": 0})
        ax.set(title=f"image {image_id}: top tokens at layer {best}", xticks=[], yticks=[])
        save_figure(fig, out, f"neo_logit_lens_map_{image_id}")


def _knockout(t: pd.DataFrame, out: Path) -> None:
    for metric in ("relative_accuracy", "relative_probability"):
        grid = t.assign(pair=t["from"] + " → " + t["to"]).pivot(index="pair", columns="window", values=metric)
        grid = grid.reindex(index=list(dict.fromkeys(t["from"] + " → " + t["to"])), columns=list(dict.fromkeys(t.window)))
        fig, ax = plt.subplots(figsize=(6, 3))
        im = ax.imshow(grid.to_numpy(dtype=float), cmap="RdYlGn", vmin=0, vmax=1.2)
        ax.set_xticks(range(grid.shape[1]), grid.columns, fontsize=7)
        ax.set_yticks(range(grid.shape[0]), grid.index, fontsize=7)
        for (r, c), v in pd.DataFrame(grid.to_numpy()).stack().items():
            ax.text(c, r, f"{v:.2f}", ha="center", va="center", fontsize=6)
        fig.colorbar(im, ax=ax)
        ax.set(title=f"attention knockout: {metric.replace('_', ' ')}")
        save_figure(fig, out, f"neo_table2_knockout_{metric}")
    (out / "neo_table2_knockout.md").write_text(markdown_table(t) + "\n")
