"""Attribution patching of an SAE feature onto attention heads (paper §5.2, A.9–A.12).

Objective J for feature f at layer L: the layer-L residual projected on f's unit decoder direction,
averaged over the prompt's text positions (``patching.positions``: text; or all).
Clean run: image + text. Corrupt run: the visual-token embeddings replaced by their mean over VQA
samples (``heads.mean_visual_tokens``). For every head view u (q, k, o of layers ≤ L):

    Method A = Σ_t (u_corr − u_clean) · ∂J/∂u |clean     ≈ J(clean, u corrupted) − J(clean)
    Method B = Σ_t (u_clean − u_corr) · ∂J/∂u |corr      ≈ J(corr, u restored) − J(corr)

Two forwards and two backwards per batch (one per run), whatever the number of heads. The exact
counterpart (``exact_effects``) runs one forward per head and view: J(clean, u corrupted) − J(clean).
Method A estimates it directly; Method B estimates the same swap from the other side, so −B is
what is compared with it.
"""
from __future__ import annotations

import torch

from stagediff.capture import StopForward, residual_hooks
from stagediff.models.vlm import token_masks
from stagediff.patching.heads import VIEWS, head_dim, head_views, mean_visual_tokens, n_heads


def unit_direction(sae, feature: int) -> torch.Tensor:
    """f's unit decoder direction v (float32): the objective's projection and the ablated direction."""
    w = sae.W_dec[feature].detach().float()
    return w / w.norm()


def widen(t: torch.Tensor) -> torch.Tensor:
    """At least float32: a bf16 model's tensors meet fp32 directions; a float64 test model stays float64."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _run(model, batch: dict, layer: int, v: torch.Tensor, positions: str, patch: dict | None = None,
         grad: bool = True):
    """One forward to layer L: (J per sample [batch], head views, their gradients or None)."""
    _, text = token_masks(batch, model)
    mask = (text if positions == "text" else batch["attention_mask"].bool())
    layers = list(range(layer + 1))
    with torch.enable_grad() if grad else torch.no_grad():
        with head_views(model, layers, patch) as views, residual_hooks(model, [layer], detach=False) as resid:
            try:
                model(**batch, use_cache=False)
            except StopForward:  # nothing after layer L can change J
                pass
        r = widen(resid[layer])  # J in (at least) float32 whatever the model's dtype
        mask = mask.to(r.dtype)
        j = ((r @ v.to(r)) * mask).sum(1) / mask.sum(1).clamp(min=1)
        grads = None
        if grad:
            keys = [(lv, view) for lv in layers for view in VIEWS]
            g = torch.autograd.grad(j.sum(), [views[k] for k in keys], allow_unused=True)
            grads = {k: (torch.zeros_like(views[k]) if gk is None else gk) for k, gk in zip(keys, g)}
    return j.detach(), {k: t.detach() for k, t in views.items()}, grads


def per_head(x: torch.Tensor, model, view: str) -> torch.Tensor:
    """[batch, seq, heads·d] summed over positions and head dims -> [batch, heads] (at least float32)."""
    b, t, _ = x.shape
    return widen(x).reshape(b, t, n_heads(model, view), head_dim(model)).sum(dim=(1, 3))


def attribution(model, batch: dict, layer: int, v: torch.Tensor, mean: torch.Tensor, positions: str) -> dict:
    """Per sample: J clean and corrupt, and Method A / B per (layer, view) as [batch, heads]."""
    j_clean, clean, g_clean = _run(model, batch, layer, v, positions)
    with mean_visual_tokens(model, mean):
        j_corr, corr, g_corr = _run(model, batch, layer, v, positions)
    out = {"j_clean": j_clean, "j_corr": j_corr, "method_a": {}, "method_b": {}}
    for k in clean:
        diff = widen(corr[k]) - widen(clean[k])
        out["method_a"][k] = per_head(diff * widen(g_clean[k]), model, k[1])
        out["method_b"][k] = per_head(-diff * widen(g_corr[k]), model, k[1])
    return out


@torch.no_grad()
def exact_effects(model, batch: dict, layer: int, v: torch.Tensor, mean: torch.Tensor, positions: str) -> dict:
    """Activation patching, one head and view at a time: J(clean, u from corrupt) − J(clean),
    per (layer, view) as [batch, heads]."""
    j_clean, _, _ = _run(model, batch, layer, v, positions, grad=False)
    with mean_visual_tokens(model, mean):
        _, corr, _ = _run(model, batch, layer, v, positions, grad=False)
    d = head_dim(model)
    out = {}
    for (lv, view), u in corr.items():
        eff = torch.zeros(u.shape[0], n_heads(model, view), dtype=j_clean.dtype, device=u.device)
        for h in range(n_heads(model, view)):
            j, _, _ = _run(model, batch, layer, v, positions, patch={(lv, view, h): u[..., h * d : (h + 1) * d]},
                           grad=False)
            eff[:, h] = j - j_clean
        out[lv, view] = eff
    return out
