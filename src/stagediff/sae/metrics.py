"""Reconstruction metrics, accumulated over many batches in float64.

FVU = Σ‖x − x̂‖² / Σ‖x − μ‖², with μ the mean of *all* rows accumulated (the held-out mean),
not a per-batch mean (sparsify) and not zero (SAELens' legacy bug). The denominator is
Σ‖x‖² − n‖μ‖², exact in float64 for residual-stream magnitudes, so one pass suffices.
"""
from __future__ import annotations

import functools

import torch


class ReconstructionStats:
    """Sums kept on the data's device: ``add`` never waits for a host copy; ``summary`` reads them once."""

    def __init__(self, d_model: int, d_sae: int, device: torch.device | str = "cpu"):
        z = functools.partial(torch.zeros, dtype=torch.float64, device=device)
        self.n = 0
        self.sse, self.sum_sq, self.l0_sum = z(()), z(()), z(())
        self.sum_x = z(d_model)
        self.fired = torch.zeros(d_sae, dtype=torch.bool, device=device)

    @torch.no_grad()
    def add(self, x: torch.Tensor, x_hat: torch.Tensor, values: torch.Tensor, indices: torch.Tensor) -> None:
        x64 = x.double()
        self.n += len(x)
        self.sse += (x64 - x_hat.double()).pow(2).sum()
        self.sum_x += x64.sum(0)
        self.sum_sq += x64.pow(2).sum()
        active = values > 0
        self.l0_sum += active.sum()
        self.fired[indices[active]] = True

    def merge(self, other: "ReconstructionStats") -> "ReconstructionStats":
        out = ReconstructionStats(len(self.sum_x), len(self.fired), self.sum_x.device)
        out.n, out.sse, out.sum_sq = self.n + other.n, self.sse + other.sse, self.sum_sq + other.sum_sq
        out.sum_x = self.sum_x + other.sum_x
        out.l0_sum = self.l0_sum + other.l0_sum
        out.fired = self.fired | other.fired
        return out

    def summary(self) -> dict:
        if self.n == 0:
            return {"n_tokens": 0, "fvu": float("nan"), "l0": float("nan"), "dead_fraction": float("nan")}
        sse, sum_sq, l0 = float(self.sse), float(self.sum_sq), float(self.l0_sum)
        variance = sum_sq - float(self.sum_x.pow(2).sum()) / self.n
        return {"n_tokens": self.n, "fvu": sse / variance if variance > 0 else float("nan"), "l0": l0 / self.n,
                "dead_fraction": 1.0 - float(self.fired.float().mean())}


@torch.no_grad()
def evaluate(sae, batches, stats: ReconstructionStats | None = None) -> ReconstructionStats:
    """Accumulate ``sae``'s reconstruction of every batch in ``batches``."""
    stats = stats or ReconstructionStats(sae.d_model, sae.d_sae, sae.device)
    for x in batches:
        v, i = sae.encode(x)
        stats.add(x, sae.decode(v, i), v, i)
    return stats
