"""Where a stage's tensors live and in which dtype: decided here, once, for every stage.

* the VLM runs on the configured device in its configured dtype (bf16 in the paper world);
* SAE math is float32 on the same device (TF32 matmuls allowed on CUDA: the SAE's inputs are
  bf16 activations, so TF32's 10-bit mantissa loses nothing they had);
* activations read from a cache go to the SAE's device as stored (bf16 bits, half the bytes of
  float32 over PCIe) and are widened there.
"""
from __future__ import annotations

import logging
import os

import torch

log = logging.getLogger(__name__)


def pick_device(requested: str = "auto") -> torch.device:
    """``auto``: CUDA if usable, else CPU. A GPU allocated but unusable falls back with a warning."""
    if requested == "cpu":
        return torch.device("cpu")
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        return torch.device("cuda")
    if requested == "cuda" or os.environ.get("CUDA_VISIBLE_DEVICES"):
        log.warning("a GPU was requested or allocated (CUDA_VISIBLE_DEVICES=%s) but CUDA is not usable; "
                    "falling back to CPU", os.environ.get("CUDA_VISIBLE_DEVICES", ""))
    return torch.device("cpu")


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def place_sae(sae: torch.nn.Module, device: torch.device | str) -> torch.nn.Module:
    """The SAE in float32 on ``device`` (the model's, for a stage that also runs the VLM)."""
    return sae.to(device=torch.device(device), dtype=torch.float32)
