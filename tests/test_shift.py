"""Shift statistics: against scipy on hand-built counts, and on a planted spatial feature."""
import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats

from stagediff.cache import ActivationStore, LayerStoreWriter, to_storage
from stagediff.data.items import SPLIT_CODES, Item
from stagediff.diff.shift import fisher_p, mark_candidates, odds_ratio, shift_table
from stagediff.sae.topk import TopKSAE

SHIFT = {"correction": "fdr_bh", "alpha": 0.05, "min_delta_p": 0.0, "min_odds_ratio": 1.0}


def test_odds_ratio_ci_and_fisher_against_scipy():
    a, b, c, d = 30, 70, 40, 260
    ratio, lo, hi = odds_ratio([a], [b], [c], [d])
    # scipy wants integer cells: (a+.5)/(b+.5) = (2a+1)/(2b+1), and Woolf's se on the doubled table
    # is our se / sqrt(2)
    t = stats.contingency.odds_ratio([[2 * a + 1, 2 * b + 1], [2 * c + 1, 2 * d + 1]], kind="sample")
    ci = t.confidence_interval(0.95)
    assert ratio[0] == pytest.approx(t.statistic)
    assert np.log(hi[0] / ratio[0]) == pytest.approx(np.sqrt(2) * np.log(ci.high / t.statistic))
    assert np.log(ratio[0] / lo[0]) == pytest.approx(np.sqrt(2) * np.log(t.statistic / ci.low))
    assert fisher_p([a], [b], [c], [d])[0] == pytest.approx(stats.fisher_exact([[a, b], [c, d]])[1])
    # a cell of 0 still gives a finite OR thanks to the correction
    assert np.isfinite(odds_ratio([0], [10], [5], [5])[0][0])


def test_benjamini_hochberg_and_bonferroni_per_split():
    p = np.array([0.001, 0.01, 0.03, 0.2])
    t = pd.DataFrame({"split": "spatial", "p_value": p, "delta_p": 0.1, "or_ci_low": 2.0})
    bh = mark_candidates(t, SHIFT)
    assert np.allclose(bh.p_adjusted, stats.false_discovery_control(p))
    bonf = mark_candidates(t, {**SHIFT, "correction": "bonferroni"})
    assert np.allclose(bonf.p_adjusted, np.minimum(p * 4, 1))
    assert bonf.candidate.tolist() == [True, True, False, False]


def test_planted_spatial_feature_is_a_candidate_and_the_decoy_is_not(tmp_path):
    # 40 val questions, 10 of them spatial; 6 tokens each. Feature 0 fires on spatial questions'
    # tokens only (x0 > 0); feature 1 fires on every token (decoy); feature 2 never fires.
    d, n_tok = 3, 6
    families = ["spatial"] * 10 + ["general"] * 30
    w = LayerStoreWriter({0: tmp_path / "L0.zarr"}, d, {"dtype": "float32", "chunk_rows": 16, "chunks_per_shard": 2},
                         {"dtype": "float32"})
    g = np.random.default_rng(0)
    items = []
    for qid, fam in enumerate(families):
        x = np.zeros((n_tok, d), np.float32)
        x[:, 0] = (1.0 if fam == "spatial" else -1.0) + g.normal(0, 0.1, n_tok)
        x[:, 1] = 1.0
        x[:, 2] = -1.0
        for m in ("text", "image"):
            w.add(m, {0: to_storage(torch.from_numpy(x[:3] if m == "text" else x[3:]), "float32")},
                  {"sample_id": np.full(3, qid), "position": np.arange(3), "token_id": np.zeros(3),
                   "split": np.full(3, SPLIT_CODES["val"])})
        items.append(Item(qid, None, "", "", (), fam, "yes/no", "val"))
    w.close({})
    sae = TopKSAE(d, d, k=d)
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(d))
        sae.W_dec.copy_(torch.eye(d))
    t = shift_table(0, sae, ActivationStore(tmp_path / "L0.zarr"), items, "val", ["spatial"], ("text", "image"))
    t = mark_candidates(t, SHIFT).set_index("feature")
    assert t.loc[0, "p_split"] == 1.0 and t.loc[0, "p_base"] == pytest.approx(10 / 40)
    assert t.loc[0, "delta_p"] == pytest.approx(0.75) and t.loc[0, "n_tokens_split"] == 60
    assert t.candidate.tolist() == [True, False, False]
    assert t.loc[1, "or_ci_low"] < 1 < t.loc[1, "or_ci_high"] and t.loc[1, "p_value"] == pytest.approx(1.0)
