"""Per-head views of a Llama attention block, and the visual-token corruption (paper §5.2).

Three views per layer, each a tensor the model really computes (hooks, no re-implementation):

    q   output of ``q_proj``: [batch, seq, n_heads · head_dim], query head h = slice h
    k   output of ``k_proj``: [batch, seq, n_kv_heads · head_dim], key head g = slice g
    o   input of ``o_proj``: [batch, seq, n_heads · head_dim], head h's attention output

Grouped-query attention: a key head g is shared by query heads g·r … g·r + r − 1 (r = n_heads /
n_kv_heads, HF's ``repeat_kv``). Key scores are therefore per *key* head; ``query_heads(g)`` names
the query heads it serves. Query and output scores are per query head.
"""
from __future__ import annotations

import contextlib

import torch

from stagediff.data.items import Item
from stagediff.models.vlm import decoder_layers, iter_batches, projector_hook, visual_embeddings

VIEWS = ("q", "k", "o")


def n_heads(model, view: str) -> int:
    c = model.config.text_config
    return c.num_key_value_heads if view == "k" else c.num_attention_heads


def head_dim(model) -> int:
    c = model.config.text_config
    return getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads


def query_heads(model, kv_head: int) -> list[int]:
    c = model.config.text_config
    r = c.num_attention_heads // c.num_key_value_heads
    return list(range(kv_head * r, (kv_head + 1) * r))


def _module(model, layer: int, view: str):
    attn = decoder_layers(model)[layer].self_attn
    return {"q": attn.q_proj, "k": attn.k_proj, "o": attn.o_proj}[view]


@contextlib.contextmanager
def head_views(model, layers: list[int], patch: dict | None = None):
    """Yield ``{(layer, view): tensor}`` filled by the next forward (graph kept for gradients).

    ``patch`` maps (layer, view, head) to a replacement [batch, seq, head_dim] for that head's slice
    (exact activation patching); the replaced tensor is what the model then uses.
    """
    captured: dict[tuple[int, str], torch.Tensor] = {}
    d = head_dim(model)
    handles = []

    def replace(layer, view, x):
        for (pl, pv, h), value in (patch or {}).items():
            if (pl, pv) == (layer, view):
                x = torch.cat([x[..., : h * d], value.to(x.dtype), x[..., (h + 1) * d :]], dim=-1)
        if torch.is_grad_enabled() and not x.requires_grad:
            # frozen weights: the first views have no graph above them, so they become its leaves
            x = x.requires_grad_()
        captured[layer, view] = x
        return x

    for layer in layers:
        for view in VIEWS:
            mod = _module(model, layer, view)
            if view == "o":
                handles.append(mod.register_forward_pre_hook(
                    lambda _m, args, layer=layer: (replace(layer, "o", args[0]),) + tuple(args[1:])))
            else:
                handles.append(mod.register_forward_hook(
                    lambda _m, _a, out, layer=layer, view=view: replace(layer, view, out)))
    try:
        yield captured
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def mean_visual_tokens(model, mean: torch.Tensor):
    """Corrupt run: the projector's output (the layer-0 visual-token embeddings) replaced by ``mean``
    ([d_model], or [n_image_tokens, d_model] for a per-position mean). Text positions are untouched:
    only the projector's output is changed, and LLaVA scatters it into the image positions alone."""
    with projector_hook(model, lambda out: mean.to(out).expand_as(out).clone()):
        yield


@torch.no_grad()
def mean_visual_embedding(model, processor, items: list[Item], per_position: bool, batch_size: int = 16) -> torch.Tensor:
    """The projector's output averaged over ``items`` (and over image positions unless ``per_position``):
    [d_model] or [n_image_tokens, d_model], float32, accumulated in float64."""
    total, n = None, 0
    for _, b in iter_batches(processor, items, batch_size):
        x = visual_embeddings(model, b["pixel_values"]).double()  # [batch, n_image_tokens, d_model]
        s = x.sum(0) if per_position else x.sum((0, 1))
        total = s if total is None else total + s
        n += x.shape[0] if per_position else x.shape[0] * x.shape[1]
    return (total / n).float().cpu()
