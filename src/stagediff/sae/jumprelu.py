"""Llama Scope's released inference form: JumpReLU with one global threshold (lm_saes
``post_processing.py``), for the ``base`` rows when ``base_sae.form: jumprelu``.

Same weights and conventions as ``TopKSAE`` (normalised inputs x·s, decoder rows of norm n_i);
a latent is active when its inference-form activation n_i·relu(pre_i)/s exceeds θ, so the number
of active latents varies per token. Evaluation only: every latent is returned, inactive ones as 0.
"""
from __future__ import annotations

import torch

from stagediff.sae.topk import TopKSAE


class JumpReLUSAE(TopKSAE):
    def __init__(self, d_model: int, d_sae: int, threshold: float, scale: float = 1.0):
        super().__init__(d_model, d_sae, d_sae, scale, rank_by_decoder_norm=True)
        self.threshold = float(threshold)

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(values, indices) over all d_sae latents; values 0 where the gate is closed."""
        pre = (x * self.scale) @ self.W_enc.T + self.b_enc
        gate = pre.relu() * self.W_dec.norm(dim=1) / self.scale > self.threshold
        idx = torch.arange(self.d_sae, device=x.device).expand(*x.shape[:-1], -1)
        return pre.relu() * gate, idx
