"""Interventions on a LLaVA forward (Neo et al. §3–4): mean-ablating chosen visual tokens, knocking
out attention between token groups, integrated gradients over visual tokens, and the logit lens.
All act through hooks on the HF model; nothing of the model is re-implemented."""
from __future__ import annotations

import contextlib

import torch

from stagediff.capture import residual_hooks
from stagediff.models.vlm import decoder_layers, eager_attention, last_positions, projector_hook, visual_embeddings


@contextlib.contextmanager
def replace_visual_tokens(model, chosen: list[set[int]], mean: torch.Tensor):
    """The i-th image through the projector inside the block (counting across batches, in order) has
    its visual tokens at indices ``chosen[i]`` replaced by ``mean`` [d]; text is never touched."""
    seen = [0]

    def replace(out):
        out = out.clone()
        for b in range(out.shape[0]):
            idx = chosen[seen[0] + b]
            if idx:
                out[b, sorted(idx)] = mean.to(out)  # the model's dtype and device
        seen[0] += out.shape[0]
        return out

    with projector_hook(model, replace):
        yield


@contextlib.contextmanager
def block_attention(model, layers: list[int], block: torch.Tensor):
    """Attention from key positions to query positions where ``block`` [batch, query, key] is true is
    removed (mask −inf, so its softmax weight is exactly 0) in ``layers``; eager attention is used
    inside the block so the mask is applied as written."""
    def hook(_m, args, kwargs):
        h = kwargs.get("hidden_states", args[0] if args else None)
        mask = kwargs.get("attention_mask")
        b, t = h.shape[:2]
        if mask is None:
            mask = torch.zeros(b, 1, t, t, dtype=h.dtype, device=h.device)
            mask = mask.masked_fill(torch.ones(t, t, dtype=torch.bool, device=h.device).triu(1), torch.finfo(h.dtype).min)
        kwargs["attention_mask"] = mask.masked_fill(block[:, None, :t, :t].to(h.device), torch.finfo(mask.dtype).min)
        return args, kwargs

    with eager_attention(model):
        handles = [decoder_layers(model)[layer].self_attn.register_forward_pre_hook(hook, with_kwargs=True)
                   for layer in layers]
        try:
            yield
        finally:
            for hd in handles:
                hd.remove()


def integrated_gradients(model, batch: dict, targets: torch.Tensor, mean: torch.Tensor, steps: int,
                         max_rows: int) -> torch.Tensor:
    """[batch, n_image_tokens] IG attribution of each row's ``targets[row]`` logit (at its last
    position) to each of its visual token embeddings, on the straight path from the mean embedding
    to the real ones (``steps`` Riemann midpoints; rows are independent, so one backward serves all).

    At most ``max_rows`` rows per backward: the graph of a full forward is kept for it (the model's
    parameters are frozen, so only activations are saved, ~4 GB per row for the 8B model)."""
    if len(targets) > max_rows:
        return torch.cat([integrated_gradients(model, {k: v[lo : lo + max_rows] for k, v in batch.items()},
                                               targets[lo : lo + max_rows], mean, steps, max_rows)
                          for lo in range(0, len(targets), max_rows)])
    x = visual_embeddings(model, batch["pixel_values"])
    x0 = mean.to(x).expand_as(x)
    targets = targets.to(x.device)
    total = torch.zeros_like(x)
    rows, last = torch.arange(len(x), device=x.device), last_positions(batch)
    for s in range(steps):
        point = (x0 + (s + 0.5) / steps * (x - x0)).requires_grad_(True)
        with projector_hook(model, lambda _out: point):
            logits = model(**batch, use_cache=False).logits[rows, last, targets]
        total += torch.autograd.grad(logits.sum(), point)[0]
    return ((x - x0) * total / steps).sum(-1)


@torch.no_grad()
def logit_lens(model, batch: dict, layers: list[int]) -> torch.Tensor:
    """[layer, batch, seq] top token of every position's block output through the final norm and
    the unembedding."""
    lm = model.model.language_model
    with residual_hooks(model, layers, stop_after_deepest=False) as resid:
        model(**batch, use_cache=False)
    return torch.stack([model.lm_head(lm.norm(resid[layer])).argmax(-1) for layer in layers])
