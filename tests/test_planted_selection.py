"""End to end on planted features: feature table → adapted set → shift → neutral filter → selection.

Synthetic activations (through the real store writer) and SAEs (real file layouts), one feature
per residual direction, so each planted property is exact. The pipeline must select the planted
spatial feature (and the planted OCR feature for the OCR split) and none of the decoys, each of
which lacks exactly one property:

    feature  rotation  fires on              under neutral prompt  expected
    0        cos 0.3   spatial questions     yes (image-driven)    selected (spatial)
    1        cos 0.2   OCR questions         yes                   selected (ocr)
    2        none      spatial questions     yes                   rejected: not adapted
    3        cos 0.25  spatial question words no (lexical)         rejected: neutral filter
    4        cos 0.35  every question        yes                   rejected: no shift
    5        cos 0.3   spatial questions     yes                   rejected: never fired in training
    6        cos 0.3   spatial, faintly      yes                   rejected: E_v below ε
    7..31    ~1        noise                 —                     background
"""
import math

import numpy as np
import pandas as pd
import pytest
import torch

from stagediff.cache import ActivationStore, LayerStoreWriter, to_storage
from stagediff.data.items import SPLIT_CODES, Item
from stagediff.diff.adapted import adapted_mask, feature_table
from stagediff.diff.neutral import layer_candidates, neutral_evidence, select_features
from stagediff.diff.shift import mark_candidates, shift_table
from stagediff.sae.finetune import save_sae
from stagediff.sae.llama_scope import save_llama_scope
from stagediff.sae.topk import TopKSAE

D = 32
N_TEXT, N_IMAGE = 3, 4
FAMILIES = ["spatial"] * 12 + ["ocr"] * 8 + ["general"] * 30
ROTATION = {0: 0.3, 1: 0.2, 3: 0.25, 4: 0.35, 5: 0.3, 6: 0.3}
CFG = {"diff": {"regime": "text", "visual_energy_tokens": "text", "p_cos": 25, "epsilon": 1e-3},
       "shift": {"correction": "fdr_bh", "alpha": 0.05, "min_delta_p": 0.0, "min_odds_ratio": 1.0},
       "neutral": {"n_samples": 3, "min_activation": 0.0, "min_fraction": 0.5, "only_adapted": False}}


def image_acts(family: str, g) -> np.ndarray:
    """What the image tokens carry: the image-driven planted features, plus background noise."""
    x = np.full((N_IMAGE, D), -1.0, np.float32)
    x[:, 7:] = g.normal(0, 1, (N_IMAGE, D - 7))
    x[:, 0] = x[:, 2] = x[:, 5] = 2.0 if family == "spatial" else -1.0
    x[:, 6] = 0.01 if family == "spatial" else -1.0
    x[:, 1] = 2.0 if family == "ocr" else -1.0
    x[:, 4] = 1.0
    return x


def question_acts(family: str, image: np.ndarray, g) -> np.ndarray:
    """Question tokens: what the image tokens carry (attention moved it), plus the question's words."""
    x = np.repeat(image[:1], N_TEXT, 0)
    x[:, 7:] = g.normal(0, 1, (N_TEXT, D - 7))
    x[:, 3] = 2.0 if family == "spatial" else -1.0  # fires on the words "left of", "above", ...
    return x


def rotate(w: torch.Tensor, cos: float, g: torch.Generator) -> torch.Tensor:
    """w turned to a direction at cosine ``cos`` from it, same norm."""
    u = torch.randn(w.shape, generator=g)
    u -= (u @ w) / (w @ w) * w
    u *= w.norm() / u.norm()
    return cos * w + math.sqrt(1 - cos**2) * u


@pytest.fixture
def planted(tmp_path):
    g = np.random.default_rng(0)
    w = LayerStoreWriter({0: tmp_path / "L0.zarr"}, D, {"dtype": "float32", "chunk_rows": 64, "chunks_per_shard": 2},
                         {"dtype": "float32"})
    items, images = [], {}
    for qid, fam in enumerate(FAMILIES):
        images[qid] = image_acts(fam, g)
        for m, x in (("image", images[qid]), ("text", question_acts(fam, images[qid], g))):
            n = len(x)
            w.add(m, {0: to_storage(torch.from_numpy(x), "float32")},
                  {"sample_id": np.full(n, qid), "position": np.arange(n), "token_id": np.zeros(n),
                   "split": np.full(n, SPLIT_CODES["val"])})
        items.append(Item(qid, None, f"question {qid}", "", (), fam, "yes/no", "val"))
    w.close({})

    base = TopKSAE(D, D, k=D)  # one feature per residual direction; k = d_sae, so relu(x_f)
    with torch.no_grad():
        base.W_enc.copy_(torch.eye(D))
        base.W_dec.copy_(torch.eye(D))
    save_llama_scope(base, tmp_path / "base", layer=0, lm_config={}, threshold=0.0)
    adapted = TopKSAE(D, D, k=D)
    adapted.load_state_dict(base.state_dict())
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for f in range(7, D):  # background: fine-tuning nudged every decoder a little
            adapted.W_dec[f] = rotate(base.W_dec[f], 1 - 0.05 * torch.rand(1, generator=gen).item(), gen)
        for f, cos in ROTATION.items():
            adapted.W_dec[f] = rotate(base.W_dec[f], cos, gen)
    (tmp_path / "text").mkdir()
    save_sae(adapted, tmp_path / "text", {"d_model": D, "d_sae": D, "top_k": D, "scale": 1.0,
                                          "rank_by_decoder_norm": True, "layer": 0, "regime": "text"})
    fires = np.full(D, 1000)
    fires[5] = 0
    pd.DataFrame({"feature": range(D), "training_fires": fires}).to_parquet(tmp_path / "text" / "features.parquet")

    def rerun(neutral_items: list[Item]) -> list[torch.Tensor]:
        """The VLM under a neutral prompt: same image, so image-driven features; no question words."""
        out = []
        for it in neutral_items:
            fam = FAMILIES[it.sample_id]
            text = question_acts(fam, images[it.sample_id], g)
            text[:, 3] = -1.0
            out.append(torch.from_numpy(np.concatenate([images[it.sample_id], text])))
        return out

    return tmp_path, items, adapted, rerun


def test_pipeline_selects_the_planted_features_and_no_decoy(planted):
    root, items, sae, rerun = planted
    table = feature_table(0, root / "base", D, {"text": root / "text"}, root / "L0.zarr", CFG["diff"])
    for f, cos in ROTATION.items():
        assert table.decoder_cosine[f] == pytest.approx(cos, abs=1e-5)
    table["adapted"] = adapted_mask(table, CFG["diff"]["p_cos"], CFG["diff"]["epsilon"])
    assert table.adapted[[0, 1, 3, 4]].all() and not table.adapted[[2, 5, 6]].any()

    store = ActivationStore(root / "L0.zarr")
    shift = mark_candidates(shift_table(0, sae, store, items, "val", ["spatial", "ocr"], ("text", "image")),
                            CFG["shift"])
    cands = shift[shift.candidate]
    assert set(cands[cands.split == "spatial"].feature) == {0, 2, 3, 5, 6}
    assert set(cands[cands.split == "ocr"].feature) == {1}

    candidates = layer_candidates(shift, table, 0, only_adapted=False)
    texts = ["Describe the positions of objects in the image.", "Describe the image."]
    evidence = neutral_evidence(rerun, sae, 0, store, items, candidates, texts, CFG["neutral"], "val")
    survival = evidence.groupby("feature").fires_after.mean()
    assert survival[3] == 0.0 and (survival.drop(3) == 1.0).all()
    assert len(evidence) == len(candidates) * CFG["neutral"]["n_samples"] * len(texts)

    sel = select_features(shift, table, evidence, CFG["neutral"], top_n=5)
    assert sorted(zip(sel.split, sel.feature)) == [("ocr", 1), ("spatial", 0)]
    assert sel.downstream.all()
