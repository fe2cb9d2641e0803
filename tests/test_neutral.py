"""Neutral-prompt filter on the tiny VLM, and the final selection on hand-built tables."""
import pandas as pd
import pytest
import torch

from stagediff.cache import ActivationStore, cache_activations
from stagediff.data.items import vqa_items
from stagediff.diff.neutral import layer_candidates, neutral_evidence, select_features, vlm_rerun
from stagediff.models.vlm import load_vlm
from stagediff.sae.topk import TopKSAE

NEUTRAL = {"n_samples": 2, "min_activation": 0.0, "min_fraction": 0.5, "only_adapted": False}


def test_feature_firing_on_every_token_survives_and_a_silent_one_does_not(tiny_world, tmp_path):
    cfg = tiny_world
    model, processor = load_vlm(cfg["model"]["vlm"])
    items = vqa_items(cfg["data"], "val", cfg["prompts"], cfg["question_splits"])
    cache_activations(model, processor, items, [1], {1: tmp_path / "L1.zarr"},
                      {"dtype": "float32", "batch_size": 8, "chunk_rows": 64, "chunks_per_shard": 2}, {"dtype": "float32"})
    d = model.config.text_config.hidden_size
    sae = TopKSAE(d, 3, k=3)
    with torch.no_grad():
        sae.W_enc.zero_()
        sae.W_dec.copy_(torch.eye(3, d))
        sae.b_enc.copy_(torch.tensor([1.0, -1.0, 0.5]))  # 0 and 2 always fire, 1 never does
    families = {it.family for it in items}
    fam = "spatial" if "spatial" in families else sorted(families)[0]
    candidates = pd.DataFrame({"feature": [0, 1], "split": fam})
    texts = [cfg["prompts"]["neutral"].format(prompt=p) for p in ("Describe the image.", "What is in the image?")]
    ev = neutral_evidence(vlm_rerun(model, processor, 1), sae, 1, ActivationStore(tmp_path / "L1.zarr"), items, candidates,
                          texts, NEUTRAL, "val")
    n_top = min(2, sum(it.family == fam for it in items))
    assert len(ev) == 2 * n_top * len(texts)
    assert ev[ev.feature == 0].fires_after.all() and ev[ev.feature == 0].act_after.eq(1.0).all()
    assert not ev[ev.feature == 1].fires_after.any()
    assert set(ev.prompt) == set(texts) and ev[ev.feature == 0].act_before.eq(1.0).all()


def test_selection_is_candidates_and_survivors_and_adapted_ranked_by_odds_ratio():
    shift = pd.DataFrame({"layer": 0, "feature": [1, 2, 3, 4, 5], "split": "spatial",
                          "candidate": [True, True, True, False, True], "odds_ratio": [2.0, 9.0, 5.0, 50.0, 7.0]})
    adapted = pd.DataFrame({"layer": 0, "feature": [1, 2, 3, 4, 5], "adapted": [True, True, True, True, False],
                            "decoder_cosine": 0.5, "visual_energy": 0.1})
    evidence = pd.DataFrame({"layer": 0, "feature": [1, 1, 2, 2, 3, 3, 5], "split": "spatial",
                             "fires_after": [True, True, True, False, False, False, True]})
    sel = select_features(shift, adapted, evidence, NEUTRAL, top_n=1)
    # 4: not a candidate; 5: not adapted; 3: does not survive; 2 (OR 9) ranks above 1 (OR 2)
    assert sel.feature.tolist() == [2, 1] and sel.downstream.tolist() == [True, False]
    assert sel.neutral_survival.tolist() == [0.5, 1.0]
    assert layer_candidates(shift, adapted, 0, only_adapted=True).feature.tolist() == [1, 2, 3]


@pytest.mark.parametrize("only_adapted", [True, False])
def test_layer_candidates_respects_the_layer(only_adapted):
    shift = pd.DataFrame({"layer": [0, 1], "feature": [7, 7], "split": "ocr", "candidate": True})
    adapted = pd.DataFrame({"layer": [0, 1], "feature": [7, 7], "adapted": [True, True]})
    assert layer_candidates(shift, adapted, 1, only_adapted).feature.tolist() == [7]
