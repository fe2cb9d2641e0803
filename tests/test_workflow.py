"""Real Snakemake runs on the tiny toy config: lint, end to end, and per-layer staleness."""
import csv
import io

import pandas as pd
import pytest
import yaml

from stagediff.cache import ActivationStore
from tests.conftest import run_smk

CFG = ["--configfile", ".test/config.yaml"]


def summary(cwd) -> dict[str, str]:
    out = run_smk("--summary", *CFG, cwd=cwd).stdout
    rows = csv.DictReader(io.StringIO(out[out.index("output_file"):]), delimiter="\t")
    return {r["output_file"]: r["plan"] for r in rows}


def test_lint(workdir):
    r = run_smk("--lint", *CFG, cwd=workdir, check=False)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.workflow
def test_end_to_end_then_only_the_changed_layer_is_stale(workdir):
    run_smk("--cores", "2", *CFG, cwd=workdir)
    res = workdir / "results" / "tiny"
    acc = pd.read_parquet(res / "tables" / "vlm_accuracy.parquet")
    assert set(acc["family"]) == {"general", "spatial", "ocr", "vsr"}
    for layer in (0, 1):
        store = ActivationStore(res / "activations" / "vqav2" / f"L{layer}.zarr")
        assert store.n_tokens("text") > 0 and store.n_tokens("image") > 0
        assert (res / "world" / "llama_scope" / f"L{layer}R-8x" / "checkpoints" / "final.safetensors").is_file()
    assert set(summary(workdir).values()) == {"no update"}

    cfg_path = workdir / ".test" / "config.yaml"
    cfg = yaml.safe_load(cfg_path.read_text())
    cfg["toy"]["base_sae"]["overrides"] = {"1": {"top_k": 2}}
    cfg_path.write_text(yaml.safe_dump(cfg))
    stale = {f for f, plan in summary(workdir).items() if plan != "no update"}
    assert stale == {"results/tiny/world/llama_scope/L1R-8x"}

    # rerunning touches exactly that job
    out = run_smk("--cores", "2", *CFG, cwd=workdir).stderr
    assert "toy_base_sae" in out and "cache_activations" not in out and "toy_vlm" not in out
    assert set(summary(workdir).values()) == {"no update"}
