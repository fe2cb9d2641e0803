"""What ``make demo`` prints at the end: does the toy VLM do what the study is about?

The study looks for spatial features, so the demo only has something to find when the toy VLM
answers spatial questions and VSR captions well above chance; and diffing base vs adapted SAEs
assumes the VLM's LM stayed near its base: its residual norms, and how well the base SAEs still
reconstruct its text tokens. The verdict says each in one line.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

SPATIAL_BAR = 0.85  # the accuracy on spatial VQA and VSR a toy VLM must reach (issue [L])
DRIFT_BAR = 2.0  # residual norm ratio VLM / base LM, at every layer (LLaVA-MORE's LM moves far less)
FVU_BAR = 0.5  # the base SAEs' held-out FVU on the VLM's text tokens, at every layer (issue [L])


def demo_summary(tables: str | Path) -> str:
    tables = Path(tables)
    acc = pd.read_parquet(tables / "vlm_accuracy.parquet")
    lines = [acc.to_string(index=False), ""]
    got = acc.set_index("family").accuracy.reindex(["spatial", "vsr"])
    ok = bool((got >= SPATIAL_BAR).all())
    lines.append(f"spatial {got['spatial']:.3f}, VSR {got['vsr']:.3f}: "
                 + (f"both clear {SPATIAL_BAR}" if ok else f"below {SPATIAL_BAR}: the demo's spatial features, "
                    "patching and ablation have little to find"))
    drift = tables / "toy_drift.parquet"
    if drift.is_file():
        d = pd.read_parquet(drift)
        worst = d.loc[d.norm_ratio.idxmax()]
        lines.append(f"LM drift: residual norm VLM / base at most {worst.norm_ratio:.2f}x (layer {int(worst.layer)}): "
                     + ("within" if worst.norm_ratio <= DRIFT_BAR else "above") + f" {DRIFT_BAR:g}x")
    fvu = tables / "sae_fvu.parquet"
    if fvu.is_file():
        f = pd.read_parquet(fvu).query("regime == 'base' and modality == 'text'")
        worst = f.loc[f.fvu.idxmax()]
        lines.append(f"base SAEs on the VLM's text tokens: held-out FVU at most {worst.fvu:.3f} "
                     f"(layer {int(worst.layer)}): " + ("within" if worst.fvu <= FVU_BAR else "above") + f" {FVU_BAR:g}")
    return "\n".join(lines)
