"""Paper-config dry run: the full 32-layer DAG planned by Snakemake (goal: under 10 s).

Every file config/llava_more.yaml names is replaced by an empty stand-in (stagediff.plan), so
this runs before anything is downloaded; the DAG is the one the real run builds from scratch.

    python benchmarks/bench_dryrun.py [--config config/llava_more.yaml] [--repeats 3]
"""
from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from stagediff.plan import REPO, standin_config


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default=str(REPO / "config" / "llava_more.yaml"))
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    raw = yaml.safe_load(Path(a.config).read_text())
    times, jobs = [], None
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "config.yaml").write_text(yaml.safe_dump(standin_config(raw, root)))
        for _ in range(a.repeats):
            t0 = time.perf_counter()
            r = subprocess.run([sys.executable, "-m", "snakemake", "-n", "--quiet", "rules", "-s",
                                str(REPO / "Snakefile"), "-d", str(root), "--configfile", str(root / "config.yaml")],
                               capture_output=True, text=True, check=True)
            times.append(time.perf_counter() - t0)
            jobs = int(re.search(r"^total +(\d+)$", r.stdout, re.M).group(1))
    t = statistics.median(times)
    print(f"paper config dry run: {jobs} jobs, median {t:.2f} s over {a.repeats} runs "
          f"(goal < 10 s: ratio {t / 10:.2f} of the limit)")


if __name__ == "__main__":
    main()
