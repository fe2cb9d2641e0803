"""The layer's one VLM job (`study-layer`) and where its tensors live."""
import json
import subprocess
import sys

import pandas as pd
import torch

from stagediff.device import place_sae
from stagediff.patching.ablation import ROW_COLUMNS
from stagediff.patching.layer import SCORE_COLUMNS
from stagediff.sae.finetune import load_sae, save_sae
from stagediff.sae.topk import TopKSAE


def test_a_layer_with_nothing_to_study_loads_nothing_and_writes_its_columns(tmp_path):
    selected = pd.DataFrame({"layer": [3], "feature": [1], "split": ["spatial"], "downstream": [True]})
    selected.to_parquet(tmp_path / "selected.parquet")
    # no model, cache, SAE or mean exists: any attempt to load one fails the job
    params = {"seed": 0, "model": {"vlm": str(tmp_path / "no_model")}, "patching": {"exact": True}}
    out = {k: tmp_path / v for k, v in (("examples", "ex.json"), ("patching-dir", "patching"),
                                         ("scores", "scores.parquet"), ("validation", "val.parquet"),
                                         ("ablation", "ablation.parquet"))}
    r = subprocess.run([sys.executable, "-m", "stagediff.cli", "study-layer", "--params", json.dumps(params),
                        "--device", "cpu", "--cache", str(tmp_path / "no_cache"), "--sae", str(tmp_path / "no_sae"),
                        "--selected", str(tmp_path / "selected.parquet"), "--mean", str(tmp_path / "no_mean"),
                        "--layer", "0", *(x for k, p in out.items() for x in (f"--{k}", str(p)))],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert json.loads(out["examples"].read_text()) == {"layer": 0, "features": []}
    assert out["patching-dir"].is_dir() and not any(out["patching-dir"].iterdir())
    assert list(pd.read_parquet(out["scores"]).columns) == SCORE_COLUMNS
    assert {"spearman_a", "top_overlap_b"} <= set(pd.read_parquet(out["validation"]).columns)
    assert list(pd.read_parquet(out["ablation"]).columns) == ROW_COLUMNS


def test_saes_are_float32_wherever_they_were_made(tmp_path):
    """SAE math is float32 beside a bf16 model: a bf16 SAE is widened, a saved one loads as float32."""
    sae = TopKSAE.random_init(8, 16, 2).to(torch.bfloat16)
    assert place_sae(sae, "cpu").W_dec.dtype == torch.float32
    save_sae(sae, tmp_path, {"d_model": 8, "d_sae": 16, "top_k": 2, "scale": 1.0, "rank_by_decoder_norm": True})
    back = load_sae(tmp_path, "cpu")
    assert back.W_enc.dtype == torch.float32 and back.device == torch.device("cpu")
