"""Reconstruction metrics, accumulated over many batches in float64.

FVU = Σ‖x − x̂‖² / Σ‖x − μ‖², with μ the mean of *all* rows accumulated (the held-out mean),
not a per-batch mean (sparsify) and not zero (SAELens' legacy bug). The denominator is
Σ‖x‖² − n‖μ‖², exact in float64 for residual-stream magnitudes, so one pass suffices.
"""
from __future__ import annotations

import torch


class ReconstructionStats:
    def __init__(self, d_model: int, d_sae: int):
        self.n = 0
        self.sse = 0.0
        self.sum_x = torch.zeros(d_model, dtype=torch.float64)
        self.sum_sq = 0.0
        self.l0_sum = 0
        self.fired = torch.zeros(d_sae, dtype=torch.bool)

    @torch.no_grad()
    def add(self, x: torch.Tensor, x_hat: torch.Tensor, values: torch.Tensor, indices: torch.Tensor) -> None:
        x64 = x.double()
        self.n += len(x)
        self.sse += (x64 - x_hat.double()).pow(2).sum().item()
        self.sum_x += x64.sum(0)
        self.sum_sq += x64.pow(2).sum().item()
        active = values > 0
        self.l0_sum += int(active.sum())
        self.fired[indices[active]] = True

    def merge(self, other: "ReconstructionStats") -> "ReconstructionStats":
        out = ReconstructionStats(len(self.sum_x), len(self.fired))
        out.n, out.sse, out.sum_sq = self.n + other.n, self.sse + other.sse, self.sum_sq + other.sum_sq
        out.sum_x = self.sum_x + other.sum_x
        out.l0_sum = self.l0_sum + other.l0_sum
        out.fired = self.fired | other.fired
        return out

    def summary(self) -> dict:
        if self.n == 0:
            return {"n_tokens": 0, "fvu": float("nan"), "l0": float("nan"), "dead_fraction": float("nan")}
        variance = self.sum_sq - self.sum_x.pow(2).sum().item() / self.n
        return {"n_tokens": self.n, "fvu": self.sse / variance if variance > 0 else float("nan"), "l0": self.l0_sum / self.n,
                "dead_fraction": 1.0 - self.fired.float().mean().item()}


@torch.no_grad()
def evaluate(sae, batches, stats: ReconstructionStats | None = None) -> ReconstructionStats:
    """Accumulate ``sae``'s reconstruction of every batch in ``batches``."""
    stats = stats or ReconstructionStats(sae.d_model, sae.d_sae)
    for x in batches:
        v, i = sae.encode(x)
        stats.add(x, sae.decode(v, i), v, i)
    return stats
