"""TopK SAE: Llama Scope semantics checked against an independent reference, sparse gradients,
the folded (SAELens) form and the float64 FVU."""
import math

import numpy as np
import pytest
import torch

from stagediff.sae.llama_scope import load_llama_scope, save_llama_scope
from stagediff.sae.metrics import ReconstructionStats, evaluate
from stagediff.sae.topk import TopKSAE


def _release_fixture(tmp_path, d=8, d_sae=32, k=4, avg_norm=5.0):
    """A Llama Scope folder with non-unit decoder columns and non-zero biases."""
    g = torch.Generator().manual_seed(0)
    sae = TopKSAE(d, d_sae, k, math.sqrt(d) / avg_norm)
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(d_sae, d, generator=g))
        sae.b_enc.copy_(torch.randn(d_sae, generator=g) * 0.1)
        sae.W_dec.copy_(torch.randn(d_sae, d, generator=g) * torch.rand(d_sae, 1, generator=g) * 3)
        sae.b_dec.copy_(torch.randn(d, generator=g))
    save_llama_scope(sae, tmp_path, layer=3, lm_config={}, threshold=0.0)
    return tmp_path


def _lm_saes_reference(folder, x, k):
    """lm_saes' from_config + TopK, written from the release's documented semantics:
    fold the dataset norm into the weights, make decoder columns unit norm (scaling encoder
    rows), then TopK on relu(W_enc x + b_enc) of the raw input."""
    import json

    from safetensors.torch import load_file

    hp = json.loads((folder / "hyperparams.json").read_text())
    w = load_file(folder / "checkpoints" / "final.safetensors")
    s = math.sqrt(hp["d_model"]) / hp["dataset_average_activation_norm"]["in"]
    W_enc, b_enc = w["encoder.weight"] * s, w["encoder.bias"].clone()
    W_dec, b_dec = w["decoder.weight"].clone(), w["decoder.bias"] / s  # W_dec *= s_in/s_out = 1
    W_dec = W_dec / s  # outputs back to the residual scale
    n = W_dec.norm(dim=0)
    W_dec, W_enc, b_enc = W_dec / n, W_enc * n[:, None], b_enc * n
    pre = torch.relu(x @ W_enc.T + b_enc)
    idx = pre.topk(k, dim=-1).indices
    f = torch.zeros_like(pre).scatter_(-1, idx, pre.gather(-1, idx))
    return f, f @ W_dec.T + b_dec


def test_llama_scope_loader_matches_the_release_semantics(tmp_path):
    folder = _release_fixture(tmp_path)
    sae = load_llama_scope(folder)
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(1)) * 5
    ref_codes, ref_recon = _lm_saes_reference(folder, x, sae.k)
    ours = sae.dense_codes(x)
    assert torch.equal(ours != 0, ref_codes != 0)  # same latents selected
    assert torch.allclose(sae(x), ref_recon, atol=1e-5)
    assert torch.allclose(sae.folded().dense_codes(x), ref_codes, atol=1e-5)  # inference-form codes


def test_l0_is_exactly_k_and_k_comes_from_config(tmp_path):
    folder = _release_fixture(tmp_path)
    x = torch.randn(128, 8, generator=torch.Generator().manual_seed(2)) * 5
    for k in (1, 4, 7):
        codes = load_llama_scope(folder, k=k).dense_codes(x)
        assert (codes > 0).sum(-1).tolist() == [k] * 128


def test_sparse_backward_equals_dense_autograd():
    g = torch.Generator().manual_seed(3)
    sae = TopKSAE.random_init(8, 40, 5, scale=0.7, generator=g)
    with torch.no_grad():
        sae.b_enc.copy_(torch.randn(40, generator=g) * 0.1)
    x = torch.randn(32, 8, generator=g)
    sae.normalised_mse(x).backward()
    ours = {n: p.grad.clone() for n, p in sae.named_parameters()}

    # dense reference: the same selection, everything through plain autograd
    ref = {n: p.detach().clone().requires_grad_(True) for n, p in sae.named_parameters()}
    xs = x * sae.scale
    pre = xs @ ref["W_enc"].T + ref["b_enc"]
    with torch.no_grad():
        idx = (pre.relu() * ref["W_dec"].norm(dim=1)).topk(5, dim=-1).indices
    f = torch.zeros_like(pre).scatter(-1, idx, pre.gather(-1, idx).relu())
    recon = (f @ ref["W_dec"] + ref["b_dec"]) / sae.scale
    ((recon - x) * sae.scale).pow(2).sum(-1).mean().backward()
    for n in ours:
        assert torch.allclose(ours[n], ref[n].grad, atol=1e-5), n


def test_folded_form_reconstructs_the_same_with_unit_decoder():
    sae = TopKSAE.random_init(8, 32, 4, scale=0.3, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        sae.W_dec.mul_(torch.linspace(0.2, 3, 32)[:, None])
    f = sae.folded()
    x = torch.randn(50, 8)
    assert torch.allclose(f.W_dec.norm(dim=1), torch.ones(32), atol=1e-5)
    assert torch.allclose(f(x), sae(x), atol=1e-5)
    assert torch.equal(f.dense_codes(x) != 0, sae.dense_codes(x) != 0)


def test_fvu_is_centred_on_the_pooled_mean_in_float64():
    sae = TopKSAE.random_init(4, 16, 2, generator=torch.Generator().manual_seed(5))
    rng = np.random.default_rng(0)
    xs = [torch.tensor(rng.normal(3.0, 1.0, (n, 4)), dtype=torch.float32) for n in (7, 30, 1)]
    stats = evaluate(sae, xs)
    x = torch.cat(xs).double()
    with torch.no_grad():
        recon = sae(torch.cat(xs)).double()
    expected = ((x - recon) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    assert math.isclose(stats.summary()["fvu"], expected.item(), rel_tol=1e-9)
    # merging two halves = accumulating all rows at once
    a, b = evaluate(sae, xs[:1]), evaluate(sae, xs[1:])
    assert math.isclose(a.merge(b).summary()["fvu"], stats.summary()["fvu"], rel_tol=1e-12)
    assert stats.summary()["l0"] <= 2


def test_dead_fraction_counts_latents_that_never_fire():
    stats = ReconstructionStats(2, 4)
    x = torch.zeros(3, 2)
    stats.add(x, x, torch.tensor([[1.0], [0.0], [2.0]]), torch.tensor([[0], [1], [0]]))
    assert stats.summary()["dead_fraction"] == 0.75  # only latent 0 fired (latent 1's value was 0)
    assert stats.summary()["l0"] == 2 / 3


def test_fvu_summary_judges_each_regime_on_its_own_span():
    import pandas as pd

    from stagediff.figures.fvu import summary_table

    rows = [{"layer": L, "regime": r, "modality": m, "fvu": f}
            for L in (0, 1)
            for r, m, f in (("text", "text", 0.1 + L), ("text", "image", 9.0), ("image", "image", 0.3),
                            ("image", "text", 9.0), ("full", "all", 0.2), ("full", "text", 9.0))]
    s = summary_table(pd.DataFrame(rows)).set_index("regime")
    assert s.loc["text", "span"] == "text" and s.loc["text", "mean"] == pytest.approx(0.6)
    assert s.loc["text", "max"] == pytest.approx(1.1)
    assert s.loc["image", "mean"] == 0.3 and s.loc["full", "span"] == "all" and s.loc["full", "n_layers"] == 2
