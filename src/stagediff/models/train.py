"""One small training loop for the toy world's models (AdamW, warmup + cosine decay)."""
from __future__ import annotations

import logging
import math
import time
from typing import Callable

import torch

log = logging.getLogger(__name__)


def item_mean_loss(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """Next-token loss averaged per item, then over items.

    HF's loss averages over all label tokens, so a 30-token caption outweighs a one-word answer
    30 to 1; here every item counts the same.
    """
    labels = batch["labels"][:, 1:]
    logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits[:, :-1]
    ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100, reduction="none")
    mask = labels != -100
    return ((ce * mask).sum(1) / mask.sum(1).clamp(min=1)).mean()


def train_loop(model: torch.nn.Module, batch_fn: Callable[[int], dict], steps: int, lr: float,
               name: str, weight_decay: float = 0.01, warmup: int = 50,
               param_lrs: dict[str, float] | None = None,
               loss_fn: Callable[[torch.nn.Module, dict], torch.Tensor] | None = None,
               probe: Callable[[str, int], None] | None = None, probe_every: int = 0) -> list[float]:
    """Train ``model`` on ``batch_fn(step)`` (HF-style kwargs with ``labels``); returns losses.

    ``probe(name, step)`` runs every ``probe_every`` steps (0: never) and after the last one, the model in
    eval mode (``benchmarks/toy_vlm_probe.py`` measures held-out accuracy along training with it).

    ``param_lrs`` maps a parameter-name prefix to its own learning rate, e.g. a smaller one for
    the pretrained language model than for a freshly initialised vision tower.
    """
    groups: dict[float, list] = {}
    for pname, p in model.named_parameters():
        if not p.requires_grad:
            continue
        plr = next((v for k, v in (param_lrs or {}).items() if pname.startswith(k)), lr)
        groups.setdefault(plr, []).append(p)
    opt = torch.optim.AdamW([{"params": ps, "lr": g} for g, ps in groups.items()],
                            weight_decay=weight_decay, betas=(0.9, 0.98))
    base = [g["lr"] for g in opt.param_groups]
    model.train()
    losses, t0 = [], time.time()
    for step in range(steps):
        f = min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / steps))
        for g, b in zip(opt.param_groups, base):
            g["lr"] = b * f
        batch = batch_fn(step)
        loss = loss_fn(model, batch) if loss_fn else model(**batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if not math.isfinite(losses[-1]):  # stop before the caller writes a model that is NaN
            raise FloatingPointError(f"{name}: non-finite loss at step {step + 1}/{steps} (batch_fn({step})); "
                                     f"nothing written")
        if step % max(1, steps // 10) == 0 or step == steps - 1:
            log.info("%s step %d/%d loss %.4f (%.1fs)", name, step + 1, steps, loss.item(), time.time() - t0)
        if probe and ((probe_every and (step + 1) % probe_every == 0) or step == steps - 1):
            model.eval()
            probe(name, step + 1)
            model.train()
    model.eval()
    return losses
