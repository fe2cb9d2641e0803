"""Capture residual streams of several decoder blocks in one forward pass, then stop.

The residual at layer L is the output of decoder block L (HF ``hidden_states[L + 1]`` for every
block but the last, whose ``hidden_states`` entry has the final norm applied; hooks avoid that
trap). The forward is aborted right after the deepest requested block, so caching layers
0..L costs one partial forward, never one forward per layer.
"""
from __future__ import annotations

import contextlib

import torch

from stagediff.data.items import Item
from stagediff.models.vlm import decoder_layers, iter_batches, to_model


class StopForward(Exception):
    pass


@contextlib.contextmanager
def residual_hooks(model, layers: list[int], stop_after_deepest: bool = True, detach: bool = True):
    """Yield a dict filled with ``{layer: block output}`` by the next forward through ``model``
    (``detach=False`` keeps the autograd graph, for gradients of the block output)."""
    blocks = decoder_layers(model)
    deepest = max(layers)
    captured: dict[int, torch.Tensor] = {}

    def hook_for(layer: int):
        def hook(_module, _args, output):
            y = output[0] if isinstance(output, tuple) else output
            captured[layer] = y.detach() if detach else y
            if stop_after_deepest and layer == deepest:
                raise StopForward

        return hook

    handles = [blocks[layer].register_forward_hook(hook_for(layer)) for layer in sorted(set(layers))]
    try:
        yield captured
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def capture_residuals(model, batch: dict, layers: list[int]) -> dict[int, torch.Tensor]:
    """One (partial) forward; returns ``{layer: [batch, seq, d_model]}``."""
    with residual_hooks(model, layers) as captured:
        try:
            model(**batch, use_cache=False)
        except StopForward:
            pass
    return captured


@torch.no_grad()
def item_residuals(model, processor, items: list[Item], layer: int, batch_size: int = 16):
    """Per item, in order: (token ids on the CPU, residuals [n_tokens, d_model] at ``layer`` in
    float32 on the model's device) over its prompt, BOS and padding dropped; image tokens included
    (their id is ``model.config.image_token_id``)."""
    for part, b in iter_batches(processor, items, batch_size):
        keep = b["attention_mask"].bool() & (b["input_ids"] != model.config.text_config.bos_token_id)
        ids = b["input_ids"]
        h = capture_residuals(model, to_model(b, model), [layer])[layer].float()
        on_device = keep.to(h.device)
        for r, it in enumerate(part):
            yield it, ids[r, keep[r]], h[r, on_device[r]]
