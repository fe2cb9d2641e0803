"""TopK SAE with Llama Scope's conventions (He et al., 2024; Gao et al., 2024).

Weights act on *normalised* inputs x·s, with s = sqrt(d_model) / dataset_average_activation_norm
fixed once from the base model's data (never re-estimated on new data). Latents are ranked by
relu(pre)·‖W_dec[:, i]‖ (``sparsity_include_decoder_norm``) because Llama Scope decoders are not
unit norm; the kept activation is relu(pre). Outputs are mapped back to the residual scale.
"""
from __future__ import annotations

import torch
from torch import nn


class TopKSAE(nn.Module):
    def __init__(self, d_model: int, d_sae: int, k: int, scale: float = 1.0,
                 rank_by_decoder_norm: bool = True):
        super().__init__()
        self.d_model, self.d_sae, self.k = d_model, d_sae, k
        self.rank_by_decoder_norm = rank_by_decoder_norm
        self.W_enc = nn.Parameter(torch.empty(d_sae, d_model))  # Llama Scope encoder.weight
        self.b_enc = nn.Parameter(torch.zeros(d_sae))
        self.W_dec = nn.Parameter(torch.empty(d_model, d_sae))  # columns are features
        self.b_dec = nn.Parameter(torch.zeros(d_model))
        self.register_buffer("scale", torch.tensor(float(scale)))

    @classmethod
    def random_init(cls, d_model: int, d_sae: int, k: int, scale: float = 1.0, decoder_norm: float = 0.5,
                    generator: torch.Generator | None = None, **kw) -> "TopKSAE":
        """Llama Scope init: decoder columns of norm ``decoder_norm``, encoder = decoder transpose."""
        sae = cls(d_model, d_sae, k, scale, **kw)
        with torch.no_grad():
            w = torch.randn(d_model, d_sae, generator=generator)
            sae.W_dec.copy_(w / w.norm(dim=0, keepdim=True) * decoder_norm)
            sae.W_enc.copy_(sae.W_dec.T)
        return sae

    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        return (x * self.scale) @ self.W_enc.T + self.b_enc

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(values, indices) of the k active latents per row; x in residual scale."""
        act = torch.relu(self.pre_acts(x))
        score = act * self.W_dec.norm(dim=0) if self.rank_by_decoder_norm else act
        idx = score.topk(self.k, dim=-1, sorted=False).indices
        return act.gather(-1, idx), idx

    def decode(self, values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """Residual-scale reconstruction from sparse codes."""
        dense = values.new_zeros(*values.shape[:-1], self.d_sae).scatter_(-1, indices, values)
        return (dense @ self.W_dec.T + self.b_dec) / self.scale

    def dense_codes(self, x: torch.Tensor) -> torch.Tensor:
        v, i = self.encode(x)
        return v.new_zeros(*v.shape[:-1], self.d_sae).scatter_(-1, i, v)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(*self.encode(x))
