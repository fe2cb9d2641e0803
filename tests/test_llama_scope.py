"""Llama Scope file layout: write, read back, same SAE; hand-computed TopK semantics."""
import json
import math

import pytest
import torch
from safetensors.torch import load_file

from stagediff.sae.llama_scope import WEIGHTS, jump_relu_threshold, load_llama_scope, save_llama_scope
from stagediff.sae.topk import TopKSAE


def test_round_trip_layout_and_encodings(tmp_path):
    g = torch.Generator().manual_seed(0)
    sae = TopKSAE.random_init(16, 64, 4, scale=math.sqrt(16) / 3.0, generator=g)
    with torch.no_grad():
        sae.b_enc.normal_(generator=g)
        sae.b_dec.normal_(generator=g)
    save_llama_scope(sae, tmp_path, layer=5, lm_config={"hidden_size": 16}, threshold=0.25)
    hp = json.loads((tmp_path / "hyperparams.json").read_text())
    assert hp["d_model"] == 16 and hp["d_sae"] == 64 and hp["top_k"] == 4
    assert hp["dataset_average_activation_norm"] == {"in": pytest.approx(3.0), "out": pytest.approx(3.0)}
    assert hp["sparsity_include_decoder_norm"] is True
    assert hp["act_fn"] == "jumprelu" and hp["jump_relu_threshold"] == 0.25  # as the post-processed release
    assert hp["hook_point_in"] == "blocks.5.hook_resid_post"
    w = load_file(tmp_path / WEIGHTS)
    assert w["encoder.weight"].shape == (64, 16) and w["decoder.weight"].shape == (16, 64)
    assert w["encoder.bias"].shape == (64,) and w["decoder.bias"].shape == (16,)
    back = load_llama_scope(tmp_path)
    x = torch.randn(32, 16, generator=g) * 3
    v1, i1 = sae.encode(x)
    v2, i2 = back.encode(x)
    assert torch.equal(sae.dense_codes(x), back.dense_codes(x))
    assert torch.allclose(sae(x), back(x))


def test_topk_ranks_by_decoder_norm_and_keeps_relu_value():
    # two latents with pre-activations 2 and 1; decoder norms 1 and 3 -> scores 2 and 3
    sae = TopKSAE(d_model=2, d_sae=2, k=1, scale=1.0)
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(2))
        sae.b_enc.zero_()
        sae.W_dec.copy_(torch.tensor([[1.0, 0.0], [0.0, 3.0]]))
        sae.b_dec.zero_()
    x = torch.tensor([[2.0, 1.0]])
    vals, idx = sae.encode(x)
    assert idx.tolist() == [[1]] and vals.tolist() == [[1.0]]
    assert sae(x).tolist() == [[0.0, 3.0]]
    sae.rank_by_decoder_norm = False
    assert sae.encode(x)[1].tolist() == [[0]]


def test_input_scaling_and_output_back_to_residual_scale():
    # s = 2: pre = 2x; reconstruction divided by s again
    sae = TopKSAE(d_model=1, d_sae=1, k=1, scale=2.0)
    with torch.no_grad():
        sae.W_enc.fill_(1.0)
        sae.b_enc.zero_()
        sae.W_dec.fill_(1.0)
        sae.b_dec.zero_()
    x = torch.tensor([[3.0]])
    assert sae.encode(x)[0].item() == 6.0
    assert sae(x).item() == 3.0


def test_missing_file_is_named(tmp_path):

    with pytest.raises(FileNotFoundError, match="hyperparams.json"):
        load_llama_scope(tmp_path)


def test_threshold_is_the_post_processing_quantile():
    """(tokens·k)-th largest n_i·relu(pre_i)/s: on these x exactly tokens·k activations pass it."""
    g = torch.Generator().manual_seed(1)
    sae = TopKSAE.random_init(8, 32, 3, scale=2.0, generator=g)
    x = torch.randn(50, 8, generator=g)
    theta = jump_relu_threshold(sae, x)
    acts = ((x * 2.0) @ sae.W_enc.T + sae.b_enc).relu() * sae.W_dec.norm(dim=1) / 2.0
    assert int((acts >= theta).sum()) == 50 * 3


def test_release_files_read_by_saelens_own_llama_scope_loader(tmp_path, monkeypatch):
    """The toy world's Llama Scope folders (stagediff's writer) and the paper-mini's release-style
    folders both load through SAELens' Llama Scope loader, hub downloads pointed at the folder."""
    from sae_lens.loading import pretrained_sae_loaders as pl

    from tests.paper_mini import llama_scope_folder

    g = torch.Generator().manual_seed(0)
    sae = TopKSAE.random_init(16, 64, 4, scale=1.5, generator=g)
    save_llama_scope(sae, tmp_path / "toy" / "L5R-8x", layer=5, lm_config={}, threshold=0.25)
    llama_scope_folder(tmp_path / "real" / "Llama3_1-8B-Base-L1R-8x", 1, 16, seed=0)
    monkeypatch.setattr(pl, "hf_hub_download", lambda repo_id, filename, subfolder=None, **_: str(
        tmp_path / repo_id / (subfolder or "") / filename))
    for repo, folder, threshold in [("toy", "L5R-8x", 0.25), ("real", "Llama3_1-8B-Base-L1R-8x", 0.35546875)]:
        cfg, state, _ = pl.llama_scope_sae_huggingface_loader(repo, folder)
        hp = json.loads((tmp_path / repo / folder / "hyperparams.json").read_text())
        s = math.sqrt(hp["d_model"]) / hp["dataset_average_activation_norm"]["in"]
        assert cfg["jump_relu_threshold"] == pytest.approx(threshold * s)
        assert state["W_enc"].shape == (hp["d_model"], hp["d_sae"])
        back = load_llama_scope(tmp_path / repo / folder, k=50 if repo == "real" else None)
        assert back.k == (50 if repo == "real" else 4)


def test_unknown_act_fn_is_refused_by_name(tmp_path):
    sae = TopKSAE.random_init(8, 16, 2)
    save_llama_scope(sae, tmp_path, layer=0, lm_config={}, threshold=0.1)
    hp = json.loads((tmp_path / "hyperparams.json").read_text())
    (tmp_path / "hyperparams.json").write_text(json.dumps({**hp, "act_fn": "relu"}))
    with pytest.raises(ValueError, match="hyperparams.json: unsupported act_fn 'relu'"):
        load_llama_scope(tmp_path)


def test_jumprelu_form_gates_at_the_released_threshold(tmp_path):
    """base_sae.form jumprelu: latent i is active where n_i·relu(pre_i)/s > θ, as lm_saes' folded
    inference form; the count per token varies, and the reconstruction sums the open latents."""
    from stagediff.sae.metrics import evaluate

    g = torch.Generator().manual_seed(3)
    sae = TopKSAE.random_init(8, 32, 3, scale=2.0, generator=g)
    x = torch.randn(40, 8, generator=g)
    theta = jump_relu_threshold(sae, x)
    save_llama_scope(sae, tmp_path, layer=0, lm_config={}, threshold=theta)
    jr = load_llama_scope(tmp_path, form="jumprelu")
    v, _ = jr.encode(x)
    pre = (x * 2.0) @ sae.W_enc.T + sae.b_enc
    open_ = pre.relu() * sae.W_dec.norm(dim=1) / 2.0 > theta
    assert torch.equal(v > 0, open_) and len(set((v > 0).sum(1).tolist())) > 1
    want = ((pre.relu() * open_) @ sae.W_dec + sae.b_dec) / 2.0
    torch.testing.assert_close(jr(x), want, rtol=1e-5, atol=1e-5)
    assert evaluate(jr, [x]).summary()["l0"] == pytest.approx(open_.sum().item() / 40)
