"""The toy world's one training loop: its probe hook runs where it says, on the model in eval mode."""
from __future__ import annotations

import torch

from stagediff.models.train import train_loop


class Regression(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 1)

    def forward(self, x, labels):
        return type("Out", (), {"loss": torch.nn.functional.mse_loss(self.lin(x).squeeze(-1), labels)})


def test_probe_runs_every_n_steps_and_after_the_last_in_eval_mode():
    torch.manual_seed(0)
    model, x = Regression(), torch.randn(64, 4)
    y = x @ torch.tensor([1.0, -2.0, 0.5, 3.0])
    seen = []

    def probe(name, step):
        with torch.no_grad():
            seen.append((name, step, model.training, model(x, y).loss.item()))

    losses = train_loop(model, lambda step: {"x": x, "labels": y}, steps=7, lr=0.05, name="fit", warmup=1,
                        probe=probe, probe_every=3)
    assert [(n, s, t) for n, s, t, _ in seen] == [("fit", 3, False), ("fit", 6, False), ("fit", 7, False)]
    assert seen[-1][3] < seen[0][3] < losses[0]  # the probe sees the model as trained so far
