"""Export an SAE in SAELens's on-disk format (``cfg.json`` + ``sae_weights.safetensors``).

Written in the folded form (see ``TopKSAE.folded``): raw residual inputs, unit-norm decoder,
no input normalisation, so ``sae_lens.SAE.load_from_disk(path)`` gives the same codes and
reconstructions without any SAELens option beyond the defaults written here.
"""
from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import save_file

from stagediff.sae.topk import TopKSAE

CFG_FILE, WEIGHTS_FILE = "cfg.json", "sae_weights.safetensors"


def save_saelens(sae: TopKSAE, folder: str | Path, hook_name: str, model_name: str) -> None:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    f = sae.folded()
    save_file({"W_enc": f.W_enc.detach().T.contiguous(), "b_enc": f.b_enc.detach().contiguous(),
               "W_dec": f.W_dec.detach().contiguous(), "b_dec": f.b_dec.detach().contiguous()},
              folder / WEIGHTS_FILE)
    cfg = {"architecture": "topk", "d_in": sae.d_model, "d_sae": sae.d_sae, "k": sae.k,
           "dtype": "float32", "device": "cpu", "apply_b_dec_to_input": False,
           "normalize_activations": "none", "rescale_acts_by_decoder_norm": True,
           "metadata": {"hook_name": hook_name, "model_name": model_name, "exported_by": "stagediff"}}
    (folder / CFG_FILE).write_text(json.dumps(cfg, indent=2, sort_keys=True))
