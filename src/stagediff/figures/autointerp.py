"""Paper Fig 3 / Fig 12 style: per described feature, its top samples (image with the feature's
activation over the patches, prompt with activating tokens marked) under the description and F1."""
from __future__ import annotations

import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from stagediff.autointerp.prompts import marked_text, overlay  # noqa: E402
from stagediff.io import atomic_dir, read_json, save_figure  # noqa: E402
from stagediff.models.vlm import model_view  # noqa: E402


def autointerp_figures(dirs: list[str | Path], out_dir: str | Path, pad_to_square: bool = False) -> None:
    with atomic_dir(out_dir) as tmp:
        for d in dirs:
            for path in sorted(Path(d).glob("feature_*.json")):
                _figure(read_json(path), tmp, pad_to_square)


def _figure(rec: dict, out: Path, pad_to_square: bool) -> None:
    top = rec["examples"]
    fig, axes = plt.subplots(1, max(1, len(top)), figsize=(2.6 * max(1, len(top)), 3.4), squeeze=False)
    for ax, ex in zip(axes[0], top):
        ax.imshow(overlay(model_view(ex["image"], pad_to_square), ex["image_activations"]))
        ax.set_title(f"{ex['source']} · {ex['family']} · max {ex['max_activation']:.2f}", fontsize=7)
        ax.set_xlabel(textwrap.fill(marked_text(ex), 34), fontsize=6)
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in axes[0][len(top):]:
        ax.axis("off")
    f1 = f"F1 {rec['f1']:.2f}" if rec.get("f1") is not None else " ".join(filter(None, [rec["status"], rec["failure"]]))
    head = f"L{rec['layer']} feature {rec['feature']} ({', '.join(rec['splits'])}) — {f1} — {rec['backend']}: {rec['model']}"
    fig.suptitle(head + "\n" + textwrap.fill(f"this neuron activates for {rec['description']}", 110), fontsize=8)
    save_figure(fig, out, f"fig3_L{rec['layer']}_f{rec['feature']}")
