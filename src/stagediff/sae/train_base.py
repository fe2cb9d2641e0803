"""Train the toy world's "Llama Scope": TopK SAEs on the text-only base LM's residual stream.

Recipe after Llama Scope: dataset-wise input normalisation, decoder init norm 0.5, ranking by
decoder norm, Adam. Saved in the release's file layout so the paper-world loader reads it.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path

import torch
from transformers import AutoTokenizer, LlamaForCausalLM

from stagediff.capture import capture_residuals
from stagediff.io import atomic_dir
from stagediff.models.toy_lm import corpus_lines
from stagediff.sae.llama_scope import jump_relu_threshold, save_llama_scope
from stagediff.sae.topk import TopKSAE
from stagediff.seed import seed_everything

log = logging.getLogger(__name__)


@torch.no_grad()
def text_residuals(base_lm: str | Path, corpus: str | Path, layer: int, max_lines: int,
                   batch_size: int = 64) -> torch.Tensor:
    """Layer-``layer`` residuals of the base LM on its text corpus, BOS and padding dropped."""
    tok = AutoTokenizer.from_pretrained(base_lm)
    model = LlamaForCausalLM.from_pretrained(base_lm, use_safetensors=True).eval()
    lines = corpus_lines(corpus, max_lines)
    out = []
    for i in range(0, len(lines), batch_size):
        b = tok([tok.bos_token + t for t in lines[i : i + batch_size]], return_tensors="pt",
                padding=True, add_special_tokens=False)
        h = capture_residuals(model, dict(b), [layer])[layer]
        keep = b["attention_mask"].bool() & (b["input_ids"] != tok.bos_token_id)
        out.append(h[keep])
    return torch.cat(out)


def train_base_sae(base_lm: str | Path, corpus: str | Path, layer: int, out: str | Path, cfg: dict,
                   seed: int) -> None:
    seed_everything(seed + layer)
    x = text_residuals(base_lm, corpus, layer, cfg["max_lines"])
    avg_norm = x.norm(dim=-1).mean().item()
    d = x.shape[1]
    gen = torch.Generator().manual_seed(seed + layer)
    sae = TopKSAE.random_init(d, d * cfg["expansion_factor"], cfg["top_k"], math.sqrt(d) / avg_norm,
                              generator=gen)
    with torch.no_grad():  # start the decoder bias at the (normalised) data mean
        sae.b_dec.copy_(x.mean(0) * sae.scale)
    opt = torch.optim.Adam(sae.parameters(), lr=cfg["lr"], betas=(0.9, 0.9999))
    for step in range(cfg["steps"]):
        xb = x[torch.randint(len(x), (cfg["batch_size"],), generator=gen)]
        loss = sae.normalised_mse(xb)  # in the normalised space, as Llama Scope trains
        if not torch.isfinite(loss):
            raise FloatingPointError(f"base SAE L{layer}: non-finite loss at step {step + 1}/{cfg['steps']} "
                                     f"(residual rows drawn by torch.randint from seed {seed + layer}); nothing written")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % max(1, cfg["steps"] // 5) == 0 or step == cfg["steps"] - 1:
            with torch.no_grad():
                fvu = ((sae(x) - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum()).item()
            log.info("base SAE L%d step %d/%d loss %.4f FVU %.4f", layer, step + 1, cfg["steps"], loss.item(), fvu)
    lm_config = LlamaForCausalLM.config_class.from_pretrained(base_lm).to_dict()
    with atomic_dir(out) as tmp:
        save_llama_scope(sae, tmp, layer, lm_config, jump_relu_threshold(sae, x[:4096]))
