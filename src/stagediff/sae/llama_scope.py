"""Read and write SAEs in the Llama Scope release layout (fnlp/Llama3_1-8B-Base-LXR-8x).

One folder per layer (``Llama3_1-8B-Base-L15R-8x/``) holding ``hyperparams.json``,
``lm_config.json`` and ``checkpoints/final.safetensors`` with torch ``nn.Linear`` keys:
``encoder.weight [d_sae, d_model]``, ``encoder.bias``, ``decoder.weight [d_model, d_sae]``,
``decoder.bias``. Weights live in the dataset-normalised space; the loader keeps them raw and
applies s = sqrt(d_model) / dataset_average_activation_norm["in"] to the input instead.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from stagediff.sae.topk import TopKSAE

WEIGHTS = Path("checkpoints") / "final.safetensors"


def hyperparams(sae: TopKSAE, layer: int, avg_norm: float) -> dict:
    hook = f"blocks.{layer}.hook_resid_post"
    return {"d_model": sae.d_model, "d_sae": sae.d_sae, "expansion_factor": sae.d_sae // sae.d_model,
            "hook_point_in": hook, "hook_point_out": hook, "act_fn": "topk", "top_k": sae.k,
            "norm_activation": "dataset-wise",
            "dataset_average_activation_norm": {"in": avg_norm, "out": avg_norm},
            "sparsity_include_decoder_norm": sae.rank_by_decoder_norm,
            "apply_decoder_bias_to_pre_encoder": False, "use_decoder_bias": True,
            "init_decoder_norm": 0.5}


def save_llama_scope(sae: TopKSAE, folder: str | Path, layer: int, lm_config: dict) -> None:
    folder = Path(folder)
    avg_norm = math.sqrt(sae.d_model) / float(sae.scale)
    (folder / WEIGHTS).parent.mkdir(parents=True, exist_ok=True)
    save_file({"encoder.weight": sae.W_enc.detach().contiguous(), "encoder.bias": sae.b_enc.detach().contiguous(),
               "decoder.weight": sae.W_dec.detach().T.contiguous(), "decoder.bias": sae.b_dec.detach().contiguous()},
              folder / WEIGHTS)
    (folder / "hyperparams.json").write_text(json.dumps(hyperparams(sae, layer, avg_norm), indent=2))
    (folder / "lm_config.json").write_text(json.dumps(lm_config, indent=2))


def load_llama_scope(folder: str | Path, k: int | None = None, dtype: torch.dtype = torch.float32) -> TopKSAE:
    """A Llama Scope folder as a TopK SAE (k from ``top_k`` unless given, as the paper's k=50)."""
    folder = Path(folder)
    hp_path, w_path = folder / "hyperparams.json", folder / WEIGHTS
    for p in (hp_path, w_path):
        if not p.is_file():
            raise FileNotFoundError(f"Llama Scope SAE file missing: {p}")
    hp = json.loads(hp_path.read_text())
    if hp.get("norm_activation") not in ("dataset-wise", "inference"):
        raise ValueError(f"{hp_path}: unsupported norm_activation {hp.get('norm_activation')!r}")
    norm = hp["dataset_average_activation_norm"]
    if not math.isclose(norm["in"], norm["out"]):
        raise ValueError(f"{hp_path}: in/out norms differ; only residual (R) SAEs are supported")
    scale = math.sqrt(hp["d_model"]) / norm["in"] if hp["norm_activation"] == "dataset-wise" else 1.0
    w = load_file(w_path)
    sae = TopKSAE(hp["d_model"], hp["d_sae"], k or hp["top_k"], scale,
                  rank_by_decoder_norm=hp.get("sparsity_include_decoder_norm", False))
    expected = {"encoder.weight": (hp["d_sae"], hp["d_model"]), "decoder.weight": (hp["d_model"], hp["d_sae"])}
    for key, shape in expected.items():
        if tuple(w[key].shape) != shape:
            raise ValueError(f"{w_path}: {key} has shape {tuple(w[key].shape)}, expected {shape}")
    with torch.no_grad():
        sae.W_enc.copy_(w["encoder.weight"])
        sae.b_enc.copy_(w["encoder.bias"])
        sae.W_dec.copy_(w["decoder.weight"].T)
        sae.b_dec.copy_(w["decoder.bias"])
    return sae.to(dtype)
