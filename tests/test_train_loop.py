"""The toy world's one training loop: its probe hook runs where it says, on the model in eval mode."""
from __future__ import annotations

import pytest
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


def test_text_only_batches_train_the_lm_and_leave_the_projector(tiny_world):
    """``toy.vlm.text_every: 1``: grounding and instruction tuning see corpus lines only, so from the
    end of grounding on the LM moves and the projector (no gradient from text) does not; the
    lines are the corpus minus the drift table's."""
    import copy

    from stagediff.models.toy_lm import corpus_lines
    from stagediff.models.toy_vlm import train_toy_vlm

    cfg = tiny_world
    vlm = copy.deepcopy(cfg["toy"]["vlm"]) | {"text_every": 1, "steps": 4}
    corpus = f"{cfg['toy']['root']}/data/corpus.txt"
    text = corpus_lines(corpus, cfg["toy"]["drift_lines"], rest=True)
    assert text and not set(text) & set(corpus_lines(corpus, cfg["toy"]["drift_lines"]))
    seen = {}

    def probe(model, processor, stage, step):
        seen[stage] = {n: p.detach().clone() for n, p in model.named_parameters()}

    train_toy_vlm(cfg["toy"]["root"] + "/base_lm", cfg["data"], cfg["prompts"], None, vlm,
                  cfg["toy"]["data"]["image_size"], cfg["seed"], text=text, probe=probe)
    before, after = seen["toy_vlm grounding"], seen["toy_vlm instruction tuning"]
    moved = {n for n in before if not torch.equal(before[n], after[n])}
    assert moved and all(n.startswith(("model.language_model", "lm_head")) for n in moved)
    with pytest.raises(ValueError, match="toy.vlm.text_every"):
        train_toy_vlm(cfg["toy"]["root"] + "/base_lm", cfg["data"], cfg["prompts"], None, vlm,
                      cfg["toy"]["data"]["image_size"], cfg["seed"])
