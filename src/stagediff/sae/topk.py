"""TopK SAE with Llama Scope's conventions (He et al., 2024; Gao et al., 2024).

Weights act on *normalised* inputs x·s, with s = sqrt(d_model) / dataset_average_activation_norm
fixed once from the base model's data (never re-estimated on new data). Latents are ranked by
relu(pre)·‖W_dec[i]‖ (``sparsity_include_decoder_norm``) because Llama Scope decoders are not
unit norm; the kept activation is relu(pre). Outputs are mapped back to the residual scale.

Layout: ``W_enc`` [d_sae, d_model] and ``W_dec`` [d_sae, d_model], one row per feature (the
Llama Scope file stores the decoder transposed; see llama_scope.py). Rows make the sparse
training path cheap: forward and backward touch only the k active rows per token.
"""
from __future__ import annotations

import warnings

import torch
from torch import nn
from torch.nn import functional as F


def _latent_by_token(indices: torch.Tensor, values: torch.Tensor, d_sae: int) -> torch.Tensor:
    """Sparse [d_sae, B] matrix of the k (latent, token) -> value entries per token."""
    rows = torch.arange(len(indices), device=indices.device).repeat_interleave(indices.shape[1])
    return torch.sparse_coo_tensor(torch.stack([indices.flatten(), rows]), values.flatten(),
                                   (d_sae, len(indices)), check_invariants=False)


def _sampled_rows_dot(a: torch.Tensor, W: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """out[b, j] = a[b] · W[indices[b, j]]: (a Wᵀ) evaluated only at the k indices per row.

    sampled_addmm on a CSR pattern avoids materialising the [B, k, d] gather (4x faster).
    """
    B, k = indices.shape
    if W.device.type != "cpu":  # CUDA's sampled_addmm wants sorted, 32-bit CSR; the gather is fine there
        return torch.einsum("bkd,bd->bk", W[indices], a)
    sorted_idx, order = indices.sort(dim=-1)
    crow = torch.arange(0, B * k + 1, k, device=indices.device)
    with warnings.catch_warnings():  # "CSR support is in beta": sampled_addmm is what we need of it
        warnings.simplefilter("ignore", UserWarning)
        pattern = torch.sparse_csr_tensor(crow, sorted_idx.flatten(), a.new_zeros(B * k), (B, W.shape[0]),
                                          check_invariants=False)
    vals = torch.sparse.sampled_addmm(pattern, a, W.T, beta=0.0).values().view(B, k)
    return torch.empty_like(vals).scatter_(1, order, vals)


class _SparseEncode(torch.autograd.Function):
    """relu(x W_encᵀ + b) at the selected indices; backward costs O(B·k·d), not O(B·d_sae·d).

    The weight gradient is Gᵀx with G [B, d_sae] zero outside k entries per row: one sparse
    matmul (~4x faster on CPU than sparsify's index_add of a materialised [B, k, d] tensor).
    """

    @staticmethod
    def forward(ctx, x, W_enc, b_enc, pre, indices):
        values = torch.relu(pre.gather(-1, indices))
        ctx.save_for_backward(x, W_enc, indices, values)
        return values

    @staticmethod
    def backward(ctx, grad_values):
        x, W_enc, indices, values = ctx.saved_tensors
        g = grad_values * (values > 0)  # relu gate
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = F.embedding_bag(indices, W_enc, per_sample_weights=g, mode="sum")
        grad_W = torch.sparse.mm(_latent_by_token(indices, g, W_enc.shape[0]), x)
        grad_b = torch.zeros(W_enc.shape[0], dtype=g.dtype, device=g.device).index_add_(0, indices.flatten(),
                                                                                       g.flatten())
        return grad_x, grad_W, grad_b, None, None


class _SparseDecode(torch.autograd.Function):
    """Σ_j values_j · W_dec[indices_j]; backward again one sparse matmul for W_dec.

    (torch's embedding_bag backward sorts all B·k indices on CPU and is ~7x slower.)
    """

    @staticmethod
    def forward(ctx, values, indices, W_dec):
        ctx.save_for_backward(values, indices, W_dec)
        return F.embedding_bag(indices, W_dec, per_sample_weights=values, mode="sum")

    @staticmethod
    def backward(ctx, grad_out):
        values, indices, W_dec = ctx.saved_tensors
        grad_values = _sampled_rows_dot(grad_out, W_dec, indices) if ctx.needs_input_grad[0] else None
        grad_W = torch.sparse.mm(_latent_by_token(indices, values, W_dec.shape[0]), grad_out)
        return grad_values, None, grad_W


class TopKSAE(nn.Module):
    def __init__(self, d_model: int, d_sae: int, k: int, scale: float = 1.0,
                 rank_by_decoder_norm: bool = True):
        super().__init__()
        self.d_model, self.d_sae, self.k = d_model, d_sae, k
        self.rank_by_decoder_norm = rank_by_decoder_norm
        self.W_enc = nn.Parameter(torch.empty(d_sae, d_model))
        self.b_enc = nn.Parameter(torch.zeros(d_sae))
        self.W_dec = nn.Parameter(torch.empty(d_sae, d_model))
        self.b_dec = nn.Parameter(torch.zeros(d_model))
        self.register_buffer("scale", torch.tensor(float(scale)))

    @property
    def device(self) -> torch.device:
        return self.W_dec.device

    @classmethod
    def random_init(cls, d_model: int, d_sae: int, k: int, scale: float = 1.0, decoder_norm: float = 0.5,
                    generator: torch.Generator | None = None, **kw) -> "TopKSAE":
        """Llama Scope init: decoder rows of norm ``decoder_norm``, encoder = decoder."""
        sae = cls(d_model, d_sae, k, scale, **kw)
        with torch.no_grad():
            w = torch.randn(d_sae, d_model, generator=generator)
            sae.W_dec.copy_(w / w.norm(dim=1, keepdim=True) * decoder_norm)
            sae.W_enc.copy_(sae.W_dec)
        return sae

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(values, indices) of the k active latents per row; x in residual scale."""
        xs = x * self.scale
        with torch.no_grad():  # dense pre-activations only select; gradients go through _SparseEncode
            pre = torch.addmm(self.b_enc, xs.reshape(-1, self.d_model), self.W_enc.T).reshape(*x.shape[:-1], -1)
            score = pre.relu() * self.W_dec.norm(dim=1) if self.rank_by_decoder_norm else pre.relu()
            idx = score.topk(self.k, dim=-1, sorted=False).indices
        if not torch.is_grad_enabled():
            return pre.gather(-1, idx).relu(), idx
        flat = _SparseEncode.apply(xs.reshape(-1, self.d_model), self.W_enc, self.b_enc,
                                   pre.reshape(-1, self.d_sae), idx.reshape(-1, self.k))
        return flat.reshape(idx.shape), idx

    def decode(self, values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """Residual-scale reconstruction from sparse codes (only the k active rows are read)."""
        lead = values.shape[:-1]
        out = _SparseDecode.apply(values.reshape(-1, self.k), indices.reshape(-1, self.k), self.W_dec)
        return ((out + self.b_dec) / self.scale).reshape(*lead, self.d_model)

    @torch.no_grad()
    def folded(self) -> "TopKSAE":
        """The same SAE on raw residuals with unit-norm decoder rows (Llama Scope's inference form).

        s is folded into the weights and each decoder norm n_i into its encoder row, so codes
        become relu(pre_i)·n_i: the size of feature i's contribution. Reconstructions and the
        selected latents are unchanged.
        """
        n = (self.W_dec / self.scale).norm(dim=1)
        out = TopKSAE(self.d_model, self.d_sae, self.k, 1.0, self.rank_by_decoder_norm).to(self.W_enc.dtype)
        out.W_enc.copy_(self.W_enc * self.scale * n[:, None])
        out.b_enc.copy_(self.b_enc * n)
        out.W_dec.copy_(self.W_dec / self.scale / n[:, None])
        out.b_dec.copy_(self.b_dec / self.scale)
        return out

    def dense_codes(self, x: torch.Tensor) -> torch.Tensor:
        v, i = self.encode(x)
        return v.new_zeros(*v.shape[:-1], self.d_sae).scatter_(-1, i, v)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(*self.encode(x))

    def normalised_mse(self, x: torch.Tensor, x_hat: torch.Tensor | None = None) -> torch.Tensor:
        """Training loss: squared error in the normalised space, summed over d, mean over tokens."""
        return (((self(x) if x_hat is None else x_hat) - x) * self.scale).pow(2).sum(-1).mean()
