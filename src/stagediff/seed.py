"""Seeding, in one place (device choice: ``stagediff.device``)."""
from __future__ import annotations

import random

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    # Same config, same thread count -> bitwise-equal tables on CPU. Across thread counts, float
    # reductions may differ in the last digits (~1e-6 relative).
    torch.use_deterministic_algorithms(True, warn_only=True)
