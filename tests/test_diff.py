"""Stage-wise diffing: per-feature table on planted SAEs, the adapted set and the threshold sweep."""
import math

import numpy as np
import pandas as pd
import pytest
import torch

from stagediff.diff.adapted import adapted_mask, feature_table, threshold_sweep
from stagediff.sae.finetune import save_sae
from stagediff.sae.llama_scope import save_llama_scope
from stagediff.sae.topk import TopKSAE
from tests.test_sae_finetune import D, D_SAE, K, make_store

DIFF = {"regime": "text", "visual_energy_tokens": "text", "p_cos": 25, "epsilon": 1e-3}


def _write_sae(sae, folder, fires):
    folder.mkdir()
    save_sae(sae, folder, {"d_model": D, "d_sae": D_SAE, "top_k": K, "scale": float(sae.scale),
                           "rank_by_decoder_norm": True, "layer": 0, "regime": folder.name})
    pd.DataFrame({"feature": range(D_SAE), "training_fires": fires}).to_parquet(folder / "features.parquet")


def test_planted_rotation_and_never_fired_feature(tmp_path):
    store = make_store(tmp_path / "L0.zarr")
    base = TopKSAE.random_init(D, D_SAE, K, scale=math.sqrt(D) / 6.0, generator=torch.Generator().manual_seed(0))
    save_llama_scope(base, tmp_path / "base", layer=0, lm_config={}, threshold=0.0)
    text = TopKSAE(D, D_SAE, K, float(base.scale))
    text.load_state_dict(base.state_dict())
    with torch.no_grad():  # feature 3: decoder rotated to an orthogonal direction, same norm
        w = text.W_dec[3].clone()
        text.W_dec[3] = torch.roll(w, 1) - (torch.roll(w, 1) @ w) / (w @ w) * w
        text.W_dec[3] *= w.norm() / text.W_dec[3].norm()
    fires = np.full(D_SAE, 100)
    fires[5] = 0  # feature 5 never fired during fine-tuning
    _write_sae(text, tmp_path / "text", fires)
    _write_sae(base, tmp_path / "random", fires)
    t = feature_table(0, tmp_path / "base", K, {"text": tmp_path / "text", "random": tmp_path / "random"},
                      tmp_path / "L0.zarr", DIFF)
    assert len(t) == D_SAE and t.decoder_cosine[3] == pytest.approx(0.0, abs=1e-5)
    assert np.allclose(t.decoder_cosine.drop(3), 1.0, atol=1e-6)
    assert t.decoder_norm_ratio[3] == pytest.approx(1.0, abs=1e-5)
    assert t.never_fired[5] and not t.never_fired.drop(5).any()
    # E_v and firing rates come from the adapted SAE's codes on the held-out text tokens
    folded = text.folded()
    x = store.acts("text", *store.split_rows("text", "val"))
    with torch.no_grad():
        codes = folded.dense_codes(x)
    assert np.allclose(t.visual_energy, (codes.double() ** 2).mean(0).numpy(), rtol=1e-6)
    assert np.allclose(t.firing_rate_text, (codes > 0).double().mean(0).numpy())


def _table(cos, ev, layer, never=None):
    n = len(cos)
    return pd.DataFrame({"layer": layer, "feature": range(n), "decoder_cosine": cos, "visual_energy": ev,
                         "never_fired": np.zeros(n, bool) if never is None else never})


def test_adapted_set_is_global_and_ignores_never_fired_features():
    t = pd.concat([_table([0.1, 0.2, 0.9, 0.95], [1, 0, 1, 1], 0),
                   _table([0.3, 0.8, 0.99, 1.0], [1, 1, 1, 1], 1, never=np.array([False] * 3 + [True]))],
                  ignore_index=True)
    # pool = the 7 fired features; their 40th percentile cosine is 0.5 (linear between 0.3 and 0.8)
    sel = adapted_mask(t, p_cos=40, epsilon=0.5)
    assert sel.tolist() == [True, False, False, False, True, False, False, False]
    assert np.percentile(t.decoder_cosine[~t.never_fired], 40) == pytest.approx(0.5)


def test_threshold_sweep_matches_the_operating_point():
    rng = np.random.default_rng(0)
    t = pd.concat([_table(rng.uniform(0, 1, 50), rng.choice([0, 1e-2], 50), layer) for layer in range(3)],
                  ignore_index=True)
    s = threshold_sweep(t, [10, 25, 50], [0, 1e-3], p_cos=25, epsilon=1e-3).set_index(["p_cos", "epsilon"])
    op = s.loc[(25, 1e-3)]
    assert op.jaccard == 1.0 and op.layer_count_corr == pytest.approx(1.0)
    assert op.n_selected == adapted_mask(t, 25, 1e-3).sum()
    assert s.loc[(50, 0)].n_selected >= s.loc[(25, 1e-3)].n_selected
