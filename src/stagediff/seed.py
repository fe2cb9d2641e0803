"""Seeding and device choice, in one place."""
from __future__ import annotations

import logging
import os
import random

import numpy as np
import torch

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    # Same config, same thread count -> bitwise-equal tables on CPU. Across thread counts, float
    # reductions may differ in the last digits (~1e-6 relative).
    torch.use_deterministic_algorithms(True, warn_only=True)


def pick_device(requested: str = "auto") -> torch.device:
    """``auto``: CUDA if usable, else CPU. A GPU allocated but unusable falls back with a warning."""
    if requested == "cpu":
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda")
    if requested == "cuda" or os.environ.get("CUDA_VISIBLE_DEVICES"):
        log.warning("a GPU was requested or allocated (CUDA_VISIBLE_DEVICES=%s) but CUDA is not usable; "
                    "falling back to CPU", os.environ.get("CUDA_VISIBLE_DEVICES", ""))
    return torch.device("cpu")
