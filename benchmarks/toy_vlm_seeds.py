"""Does the toy VLM learn what the study is about on this machine, whatever the seed?

For each seed, the demo config (``config/config.yaml``) with only ``seed``, ``name`` and
``toy.root`` changed runs through Snakemake up to the VLM's accuracy table and the LM-drift
table: the toy data, base LM and toy VLM are all made from that seed, each job with the thread
count Snakemake gives it (``OMP_NUM_THREADS`` = the rule's threads). Prints per seed: spatial and
VSR accuracy against the 0.85 bar, their majority baselines, and the largest residual-norm ratio
VLM / base LM against 2x.

    python benchmarks/toy_vlm_seeds.py [--seeds 0 1 2] [--cores 2] [--workdir results/seeds]

Slow: one toy world per seed (the toy VLM's training is most of it).
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import yaml

from stagediff.summary import DRIFT_BAR, SPATIAL_BAR

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--cores", type=int, default=2)
    ap.add_argument("--workdir", default=str(REPO / "results" / "seeds"))
    a = ap.parse_args()
    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    base = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    rows = []
    for seed in a.seeds:
        name = f"toy_seed{seed}"
        # every toy path (data, models, SAEs) is derived from toy.root (stagediff.config.resolve_world)
        cfg = {**base, "seed": seed, "name": name, "toy": {**base["toy"], "root": f"results/{name}/world"}}
        path = work / f"{name}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        tables = Path("results") / name / "tables"
        t0 = time.time()
        subprocess.run([sys.executable, "-m", "snakemake", str(tables / "vlm_accuracy.parquet"),
                        str(tables / "toy_drift.parquet"), "--cores", str(a.cores), "-s", str(REPO / "Snakefile"),
                        "-d", str(work), "--configfile", str(path)], check=True)
        acc = pd.read_parquet(work / tables / "vlm_accuracy.parquet").set_index("family")
        drift = pd.read_parquet(work / tables / "toy_drift.parquet")
        rows.append({"seed": seed, "spatial": acc.accuracy["spatial"], "spatial_majority": acc.majority_baseline["spatial"],
                     "vsr": acc.accuracy["vsr"], "vsr_majority": acc.majority_baseline["vsr"],
                     "max_norm_ratio": drift.norm_ratio.max(), "minutes": (time.time() - t0) / 60})
        print(pd.DataFrame(rows).to_string(index=False), flush=True)
    t = pd.DataFrame(rows)
    ok = (t.spatial >= SPATIAL_BAR) & (t.vsr >= SPATIAL_BAR)
    print(f"seeds with spatial and VSR >= {SPATIAL_BAR}: {int(ok.sum())}/{len(t)}; "
          f"with the LM within {DRIFT_BAR:g}x of its base: {int((t.max_norm_ratio <= DRIFT_BAR).sum())}/{len(t)}")


if __name__ == "__main__":
    main()
