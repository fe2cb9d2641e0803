"""Read and write SAEs in the Llama Scope release layout (fnlp/Llama3_1-8B-Base-LXR-8x).

One folder per layer (``Llama3_1-8B-Base-L15R-8x/``) holding ``hyperparams.json``,
``lm_config.json`` and ``checkpoints/final.safetensors`` with torch ``nn.Linear`` keys:
``encoder.weight [d_sae, d_model]``, ``encoder.bias``, ``decoder.weight [d_model, d_sae]``,
``decoder.bias``. Weights live in the dataset-normalised space; the loader keeps them raw and
applies s = sqrt(d_model) / dataset_average_activation_norm["in"] to the input instead.

The release was trained TopK-50 and post-processed to JumpReLU (lm_saes ``post_processing.py``):
``act_fn: jumprelu`` with one global ``jump_relu_threshold``. The paper re-instantiates every
base SAE as TopK-50, so the loader builds TopK and logs the form it read.
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import torch
from safetensors.torch import save_file

from stagediff.device import place_sae
from stagediff.io import read_json, read_safetensors
from stagediff.sae.jumprelu import JumpReLUSAE
from stagediff.sae.topk import TopKSAE

log = logging.getLogger(__name__)
WEIGHTS = Path("checkpoints") / "final.safetensors"


@torch.no_grad()
def jump_relu_threshold(sae: TopKSAE, x: torch.Tensor) -> float:
    """Llama Scope's post-processing threshold: the (tokens·k)-th largest activation of the SAE in
    its inference form (dataset norm folded, unit decoder rows: n_i·relu(pre_i)/s) over ``x``."""
    pre = (x * sae.scale) @ sae.W_enc.T + sae.b_enc
    acts = (pre.relu() * sae.W_dec.norm(dim=1) / sae.scale).flatten()
    return float(acts.topk(min(len(acts), len(x) * sae.k)).values[-1])


def hyperparams(sae: TopKSAE, layer: int, avg_norm: float, threshold: float) -> dict:
    """hyperparams.json as the post-processed release has it (lm_saes SAEConfig fields)."""
    hook = f"blocks.{layer}.hook_resid_post"
    return {"d_model": sae.d_model, "d_sae": sae.d_sae, "expansion_factor": sae.d_sae // sae.d_model,
            "hook_point_in": hook, "hook_point_out": hook, "act_fn": "jumprelu",
            "jump_relu_threshold": threshold, "top_k": sae.k,
            "norm_activation": "dataset-wise",
            "dataset_average_activation_norm": {"in": avg_norm, "out": avg_norm},
            "sparsity_include_decoder_norm": sae.rank_by_decoder_norm,
            "apply_decoder_bias_to_pre_encoder": False, "use_decoder_bias": True,
            "init_decoder_norm": 0.5}


def save_llama_scope(sae: TopKSAE, folder: str | Path, layer: int, lm_config: dict, threshold: float) -> None:
    folder = Path(folder)
    avg_norm = math.sqrt(sae.d_model) / float(sae.scale)
    (folder / WEIGHTS).parent.mkdir(parents=True, exist_ok=True)
    save_file({"encoder.weight": sae.W_enc.detach().contiguous(), "encoder.bias": sae.b_enc.detach().contiguous(),
               "decoder.weight": sae.W_dec.detach().T.contiguous(), "decoder.bias": sae.b_dec.detach().contiguous()},
              folder / WEIGHTS)
    (folder / "hyperparams.json").write_text(json.dumps(hyperparams(sae, layer, avg_norm, threshold), indent=2))
    (folder / "lm_config.json").write_text(json.dumps(lm_config, indent=2))


def load_llama_scope(folder: str | Path, k: int | None = None, form: str = "topk",
                     device: torch.device | str = "cpu") -> TopKSAE:
    """A Llama Scope folder as a TopK SAE (k from ``top_k`` unless given, as the paper's k=50), or
    with ``form="jumprelu"`` in the release's own JumpReLU form (its ``jump_relu_threshold``)."""
    folder = Path(folder)
    hp_path, w_path = folder / "hyperparams.json", folder / WEIGHTS
    for p in (hp_path, w_path):
        if not p.is_file():
            raise FileNotFoundError(f"Llama Scope SAE file missing: {p}")
    hp = read_json(hp_path)
    act = hp.get("act_fn")
    if act == "jumprelu" and "jump_relu_threshold" not in hp:
        raise ValueError(f"{hp_path}: act_fn jumprelu without jump_relu_threshold")
    if act not in ("jumprelu", "topk"):
        raise ValueError(f"{hp_path}: unsupported act_fn {act!r} (Llama Scope releases are jumprelu or topk)")
    if form == "jumprelu" and act != "jumprelu":
        raise ValueError(f"{hp_path}: base_sae.form jumprelu needs act_fn jumprelu, got {act!r}")
    log.info("%s: act_fn %s%s -> %s", folder, act,
             f" (jump_relu_threshold {hp['jump_relu_threshold']})" if act == "jumprelu" else "",
             "JumpReLU as released" if form == "jumprelu"
             else f"TopK-{k or hp['top_k']} (the paper re-instantiates Llama Scope as TopK)")
    if hp.get("norm_activation") not in ("dataset-wise", "inference"):
        raise ValueError(f"{hp_path}: unsupported norm_activation {hp.get('norm_activation')!r}")
    norm = hp["dataset_average_activation_norm"]
    if not math.isclose(norm["in"], norm["out"]):
        raise ValueError(f"{hp_path}: in/out norms differ; only residual (R) SAEs are supported")
    scale = math.sqrt(hp["d_model"]) / norm["in"] if hp["norm_activation"] == "dataset-wise" else 1.0
    w = read_safetensors(w_path)
    sae = (JumpReLUSAE(hp["d_model"], hp["d_sae"], hp["jump_relu_threshold"], scale) if form == "jumprelu" else
           TopKSAE(hp["d_model"], hp["d_sae"], k or hp["top_k"], scale,
                   rank_by_decoder_norm=hp.get("sparsity_include_decoder_norm", False)))
    expected = {"encoder.weight": (hp["d_sae"], hp["d_model"]), "decoder.weight": (hp["d_model"], hp["d_sae"])}
    for key, shape in expected.items():
        if tuple(w[key].shape) != shape:
            raise ValueError(f"{w_path}: {key} has shape {tuple(w[key].shape)}, expected {shape}")
    with torch.no_grad():
        sae.W_enc.copy_(w["encoder.weight"])
        sae.b_enc.copy_(w["encoder.bias"])
        sae.W_dec.copy_(w["decoder.weight"].T)
        sae.b_dec.copy_(w["decoder.bias"])
    return place_sae(sae, device)
