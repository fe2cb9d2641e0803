"""Attribution patching and ablation on the tiny VLM (float64, so finite differences are exact enough)."""
import numpy as np
import pandas as pd
import pytest
import torch

from stagediff.capture import StopForward, residual_hooks
from stagediff.data.items import vqa_items
from stagediff.models.vlm import iter_batches, load_vlm, token_masks
from stagediff.patching.ablation import ablate_direction, render, summarise
from stagediff.patching.attribution import _run, attribution, exact_effects
from stagediff.patching.heads import head_dim, mean_visual_embedding, mean_visual_tokens, n_heads
from stagediff.patching.layer import rank_agreement
from tests.conftest import first_block_input

LAYER = 1


@pytest.fixture(scope="module")
def world(tiny_world):
    cfg = tiny_world
    model, processor = load_vlm(cfg["model"]["vlm"])
    model = model.double()
    items = vqa_items(cfg["data"], "val", cfg["prompts"], cfg["question_splits"])
    (_, batch), = iter_batches(processor, items[:4], 4)
    batch["pixel_values"] = batch["pixel_values"].double()
    mean = mean_visual_embedding(model, processor, items, per_position=False).double()
    d = model.config.text_config.hidden_size
    v = torch.randn(d, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return model, processor, batch, mean, v / v.norm()


def forward(model, batch) -> None:
    """A forward that the residual hook may stop after its layer."""
    try:
        model(**batch, use_cache=False)
    except StopForward:
        pass


def test_corruption_changes_only_visual_positions(world):
    model, _, batch, mean, _ = world
    clean = first_block_input(model, batch)
    with mean_visual_tokens(model, mean):
        corrupt = first_block_input(model, batch)
    image, _ = token_masks(batch, model)
    assert torch.equal(clean[~image], corrupt[~image])
    assert torch.allclose(corrupt[image], mean.expand(int(image.sum()), -1))
    assert not torch.allclose(clean[image], corrupt[image])


def test_ablation_removes_exactly_the_component_at_text_positions_only(world):
    model, _, batch, _, v = world
    image, text = token_masks(batch, model)
    with torch.no_grad(), residual_hooks(model, [LAYER]) as clean:
        forward(model, batch)
    with torch.no_grad(), ablate_direction(model, LAYER, v, text), residual_hooks(model, [LAYER]) as ablated:
        forward(model, batch)
    y, z = clean[LAYER], ablated[LAYER]
    assert torch.equal(y[image], z[image])  # image positions untouched
    expected = y[text] - (y[text] @ v)[:, None] * v
    assert torch.allclose(z[text], expected, atol=1e-12)
    assert torch.allclose(z[text] @ v, torch.zeros(int(text.sum()), dtype=v.dtype), atol=1e-12)


def test_method_a_matches_a_finite_difference_per_head(world):
    """A = (corr − clean)·∇J is the directional derivative of J along the head's swap: compare it
    with a central difference (step 1e-2 of the swap: HF's RMSNorm computes in float32, which
    puts a ~1e-9 floor under J's differences, so smaller steps only measure rounding)."""
    model, _, batch, mean, v = world
    att = attribution(model, batch, LAYER, v, mean, "text")
    _, clean, _ = _run(model, batch, LAYER, v, "text", grad=False)
    with mean_visual_tokens(model, mean):
        _, corr, _ = _run(model, batch, LAYER, v, "text", grad=False)
    d, eps = head_dim(model), 1e-2
    checked = 0
    for (src, view) in [(0, "q"), (0, "k"), (0, "o"), (LAYER, "q"), (LAYER, "k"), (LAYER, "o")]:
        for h in range(n_heads(model, view)):
            sl = slice(h * d, (h + 1) * d)
            step = corr[src, view][..., sl] - clean[src, view][..., sl]
            j = [_run(model, batch, LAYER, v, "text", grad=False,
                      patch={(src, view, h): clean[src, view][..., sl] + s * eps * step})[0] for s in (1, -1)]
            fd = (j[0] - j[1]) / (2 * eps)
            a = att["method_a"][src, view][:, h]
            assert torch.allclose(a, fd, rtol=2e-2, atol=1e-7), (src, view, h, a, fd)
            checked += int(a.abs().max() > 1e-6)
    assert checked >= 4  # the check is not passing on zeros


def test_exact_patching_of_every_head_and_its_rank_agreement(world):
    model, _, batch, mean, v = world
    att = attribution(model, batch, LAYER, v, mean, "text")
    exact = exact_effects(model, batch, LAYER, v, mean, "text")
    assert set(exact) == {(src, view) for src in range(LAYER + 1) for view in ("q", "k", "o")}
    a = torch.cat([att["method_a"][k].mean(0) for k in exact]).numpy()
    e = torch.cat([exact[k].mean(0) for k in exact]).numpy()
    agree = rank_agreement(a, e, top=4)
    assert agree["spearman"] > 0.5 and 0 <= agree["top_overlap"] <= 1
    assert rank_agreement(e, e, 4) == pytest.approx({"spearman": 1.0, "spearman_top": 1.0, "top_overlap": 1.0})
    assert rank_agreement(-e, e, 4)["spearman"] == pytest.approx(-1.0)


def test_ablation_tables_average_seeds_and_render():
    per_seed = pd.DataFrame({"layer": 3, "feature": [7, 7, 9, 9], "seed": [0, 1, 0, 1],
                             "delta_vsr_acc": [-10.0, -6.0, 1.0, 3.0], "delta_vsr_prob": [-0.1, -0.05, 0.0, 0.02],
                             "delta_vqa_acc": [-0.5, -0.5, 0.0, 0.0], "delta_ctrl": [0.5, -0.5, 0.0, 1.0],
                             "vsr_or": [4.0, 4.0, 2.0, 2.0], "n_samples": [50, 50, 30, 30],
                             "relations": ["left of", "left of", "above", "above"]})
    t = summarise(per_seed)
    assert t.feature.tolist() == [7, 9] and t.delta_vsr_acc.tolist() == [-8.0, 2.0]
    assert t.delta_ctrl.tolist() == [0.0, 0.5] and np.isclose(t.delta_vsr_acc_sd[0], np.std([-10, -6], ddof=1))
    md, tex = render(t, top_n=1)
    assert "| 3 | 7 | -8.00 | -0.50 | 0.00 | 4.00 | left of |" in md and "ΔVSR Prob" in tex


def test_attribution_and_ablation_run_on_a_bfloat16_model(tiny_world):
    """The paper world's dtype: bf16 residuals meet the fp32 unit direction (J, Method A/B in
    float32); the ablated residual keeps no component along v beyond bf16 rounding."""
    cfg = tiny_world
    model, processor = load_vlm(cfg["model"]["vlm"], dtype="bfloat16")
    items = vqa_items(cfg["data"], "val", cfg["prompts"], cfg["question_splits"])
    (_, batch), = iter_batches(processor, items[:4], 4)
    batch["pixel_values"] = batch["pixel_values"].to(torch.bfloat16)
    mean = mean_visual_embedding(model, processor, items[:8], per_position=False)
    d = model.config.text_config.hidden_size
    v = torch.randn(d, generator=torch.Generator().manual_seed(0))
    v = v / v.norm()
    out = attribution(model, batch, LAYER, v, mean, "text")
    assert out["j_clean"].dtype == torch.float32 and torch.isfinite(out["j_clean"]).all()
    scores = torch.cat([s.flatten() for s in out["method_a"].values()])
    assert scores.dtype == torch.float32 and torch.isfinite(scores).all() and scores.abs().sum() > 0
    _, text = token_masks(batch, model)
    with torch.no_grad(), ablate_direction(model, LAYER, v, text), residual_hooks(model, [LAYER]) as ablated:
        forward(model, batch)
    z = ablated[LAYER]
    assert z.dtype == torch.bfloat16
    norm = z[text].float().norm(dim=-1)
    assert ((z[text].float() @ v).abs() <= 1e-2 * norm).all()
