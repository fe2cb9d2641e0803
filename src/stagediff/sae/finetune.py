"""Warm-start a base TopK SAE on the VLM's cached activations under one regime (paper §4.1).

Regimes decide which token spans give the training signal (the SAE is per-token, so masking
the loss to a span is reading only that span's rows):

    full    all tokens (text and image), warm start from the base SAE
    image   image tokens only, warm start
    text    text tokens only, warm start (reads only the text arrays of the cache)
    random  all tokens, same architecture from a random init (the control)

Regimes that read both modalities (full, random; image too, whose rows are ~97 % of each
batch at paper scale) can train in one job on one read of the layer (``sae_finetune.shared_read``):
the same batches in the same order, each SAE on its own modalities' rows. Training, not the disk,
then bounds the job, and the controls differ from the full regime only in their init (random) or
in the rows that give the signal (image). The text regime's ~1M train tokens fit one buffer and
are read once; it trains alone.

The base SAE's input scale s is kept in every regime, never re-estimated on the new data, so
the four SAEs and the base one live in the same normalised space and can be diffed.

Checkpoints (SAE, Adam state, dead-latent clocks, curve so far, step = data position) are
written atomically every ``checkpoint_every`` steps outside the job's output; a rerun after a
kill resumes from the last one and ends with the same weights as an uninterrupted run. The one
before it is kept too, so a checkpoint that fails to load costs ``checkpoint_every`` steps.

A non-finite loss or weight stops the job, naming the step and its rows, before anything is
written: no checkpoint and no output hold a NaN. The test runs on the device at every log and
checkpoint step (no host round trip per step).
"""
from __future__ import annotations

import contextlib
import itertools
import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from safetensors.torch import save_file

from stagediff.cache import ActivationStore, StoreParts, config_hash
from stagediff.device import place_sae
from stagediff.io import atomic_dir, read_json, read_safetensors
from stagediff.sae.llama_scope import load_llama_scope
from stagediff.sae.metrics import evaluate
from stagediff.sae.saelens import save_saelens
from stagediff.sae.stream import Block, TokenStream, read_blocks, split_blocks
from stagediff.sae.topk import TopKSAE
from stagediff.seed import seed_everything

log = logging.getLogger(__name__)
REGIMES = {"full": ("text", "image"), "image": ("image",), "text": ("text",), "random": ("text", "image")}
REGIME_SEEDS = {r: i for i, r in enumerate(REGIMES)}
CHECKPOINT = "state.pt"
PREVIOUS = "state.prev.pt"  # the checkpoint before the last one


def layer_lr(cfg: dict, layer: int) -> float:
    """The paper's layer-scaled learning rate: lr × the layer's factor (default 1)."""
    return cfg["lr"] * cfg["lr_layer_scale"].get(str(layer), 1.0)


def initial_sae(base_sae: str | Path, regime: str, k: int, gen: torch.Generator,
                first: torch.Tensor | None, device: torch.device, store: StoreParts) -> TopKSAE:
    base = load_llama_scope(base_sae, k=k, device=device)
    store.check_width(base.d_model, f"base SAE {base_sae}")
    if regime != "random":
        return base
    # drawn on the CPU generator (the same init on every device), then placed
    sae = place_sae(TopKSAE.random_init(base.d_model, base.d_sae, k, float(base.scale), generator=gen,
                                        rank_by_decoder_norm=base.rank_by_decoder_norm), device)
    with torch.no_grad():  # as any SAE init: decoder bias at the data mean (normalised space)
        sae.b_dec.copy_(first.mean(0) * sae.scale)
    return sae


def heldout_batches(store: ActivationStore, modalities: tuple[str, ...], max_tokens: int | None,
                    device: torch.device | str = "cpu", batch_size: int = 4096):
    """The val split of ``modalities`` in order, on ``device``; at most ``max_tokens`` (spread over
    modalities)."""
    blocks = split_blocks(store, modalities, "val")
    total = sum(b.stop - b.start for b in blocks)
    frac = 1.0 if max_tokens is None else min(1.0, max_tokens / total)
    for b in blocks:
        n = math.ceil((b.stop - b.start) * frac)
        x = read_blocks(store, [Block(b.modality, b.start, b.start + n)], device)
        yield from x.split(batch_size)


@dataclass
class Run:
    """One regime's SAE in a training job, with what its loop keeps."""
    regime: str
    sae: TopKSAE
    opt: torch.optim.Optimizer
    heldout: list[torch.Tensor]
    out: Path
    last_fired: torch.Tensor  # tokens seen when each latent last fired
    fires: torch.Tensor  # training tokens on which each latent fired
    sum_loss: torch.Tensor
    first_bad: torch.Tensor  # first step with a non-finite loss
    curve: list = field(default_factory=list)
    seen: int = 0  # training tokens so far (host-side: the image rows of shared batches vary in number)
    n_loss: int = 0

    def state(self) -> dict:
        return {"sae": self.sae.state_dict(), "opt": self.opt.state_dict(), "last_fired": self.last_fired,
                "fires": self.fires, "curve": self.curve, "sum_loss": self.sum_loss, "n_loss": self.n_loss,
                "seen": self.seen}

    def restore(self, state: dict) -> None:
        self.sae.load_state_dict(state["sae"])
        self.opt.load_state_dict(state["opt"])
        device = self.sae.device
        self.last_fired, self.fires = state["last_fired"].to(device), state["fires"].to(device)
        self.curve, self.n_loss, self.seen = state["curve"], state["n_loss"], state["seen"]
        self.sum_loss = torch.as_tensor(state["sum_loss"], dtype=torch.float64).to(device)


def finetune_saes(train_paths: list[str | Path], heldout_path: str | Path, base_sae: str | Path, regimes: list[str],
                  layer: int, outs: list[str | Path], checkpoint_dir: str | Path, cfg: dict, seed: int,
                  device: torch.device | str = "cpu", read_ahead: int = 4) -> None:
    """Trains one SAE per regime (to the matching ``outs`` folder) on the train split of the
    stores ``train_paths`` (the layer's train store, or its parts, one per ``cache.sample_shards``
    job, read as one); the curves' FVU is on the val split of ``heldout_path`` (the layer's
    held-out store, or a train store that holds a val split too).

    Several regimes train in lockstep on one read of the layer: the same batches, each regime's
    SAE on its modalities' rows of them (``sae_finetune.shared_read``; at paper scale each batch
    is read once instead of once per regime). ``device``: where the SAEs train (float32; the
    stream's buffer lives there, in bf16, when it fits; loss and latent clocks stay there, read
    at log steps only). ``read_ahead``: reads in flight (a speed knob: results do not depend on it)."""
    for regime in regimes:
        if regime not in REGIMES:
            raise ValueError(f"unknown regime {regime!r}; expected one of {list(REGIMES)}")
    # the stream reads the modalities of all its regimes, seeded as the first one alone would be
    modalities = tuple(m for m in ("text", "image") if any(m in REGIMES[r] for r in regimes))
    seed_everything(seed)
    store = StoreParts(train_paths)
    device = torch.device(device)
    stream = TokenStream(store, modalities, cfg["batch_size"], cfg["buffer_tokens"],
                         seed=(seed, layer, REGIME_SEEDS[regimes[0]]), device=device,
                         read_chunks=cfg["read_chunks"], read_ahead=read_ahead)
    steps = cfg["tokens"] // cfg["batch_size"]
    lr = layer_lr(cfg, layer)
    fingerprint = config_hash({"cfg": cfg, "seed": seed, "layer": layer, "regimes": list(regimes),
                               "base": str(base_sae), "store": store.attrs.get("config_hash")})
    ckpt = Path(checkpoint_dir) / CHECKPOINT
    state = _load_checkpoint(Path(checkpoint_dir), fingerprint)
    start = 0 if state is None else state["step"]
    batches = stream.batches(start, labelled=True)
    first = None
    if "random" in regimes:  # its decoder bias starts at the first batch's mean (a resume restores it)
        first = next(batches)
        batches = itertools.chain([first], batches)
    held = ActivationStore(heldout_path)
    runs = []
    for regime, out in zip(regimes, outs, strict=True):
        # its own seed stream: a random init must not repeat the base SAE's (seeded by seed + layer)
        gen = torch.Generator().manual_seed(int(np.random.SeedSequence((seed, layer, REGIME_SEEDS[regime]))
                                                .generate_state(1)[0]))
        sae = initial_sae(base_sae, regime, cfg["top_k"], gen, first[0] if regime == "random" else None, device,
                          store)
        zeros = torch.zeros(sae.d_sae, dtype=torch.long, device=device)
        runs.append(Run(regime, sae, torch.optim.Adam(sae.parameters(), lr=lr, betas=tuple(cfg["betas"]), fused=True),
                        list(heldout_batches(held, REGIMES[regime], cfg["curve_eval_tokens"], device)), Path(out),
                        zeros, zeros.clone(), torch.zeros((), dtype=torch.float64, device=device),
                        torch.full((), -1, dtype=torch.long, device=device)))
    what = f"{'+'.join(regimes)} L{layer}"
    if state is not None:
        for run in runs:
            run.restore(state["runs"][run.regime])
        log.info("resuming %s at step %d/%d (epoch, buffer, batch = %s)", what, start, steps, stream.position(start))
    for run in runs:
        if not run.curve:
            run.curve.append(_curve_row(run.sae, run.heldout, 0, float("nan"), run.last_fired, 0, cfg))
    t0 = time.time()
    for step in range(start, steps):
        x, rows = next(batches)
        for run in runs:
            own = REGIMES[run.regime]
            n = sum(len(rows[m]) for m in own)
            if n:  # (a small buffer's blocks can all be text: no image rows, no image step)
                _train_step(run, x if n == len(x) else torch.cat([x.index_select(0, rows[m]) for m in own]), step, n)
        last = step + 1 == steps
        if (step + 1) % cfg["log_every"] == 0 or (step + 1) % cfg["checkpoint_every"] == 0 or last:
            for run in runs:
                _refuse_nonfinite(run.first_bad, run.sae, stream, f"{run.regime} SAE L{layer}", ckpt)
        if (step + 1) % cfg["log_every"] == 0 or last:
            for run in runs:
                loss = float(run.sum_loss) / run.n_loss if run.n_loss else float("nan")
                run.curve.append(_curve_row(run.sae, run.heldout, run.seen, loss,
                                            run.last_fired, step + 1, cfg))
                run.sum_loss, run.n_loss = torch.zeros_like(run.sum_loss), 0
                r = run.curve[-1]
                log.info("%s L%d step %d/%d loss %.4f held-out FVU %.4f dead %.3f (%.0f tokens/s)", run.regime,
                         layer, step + 1, steps, r["loss"], r["fvu"], r["dead_fraction"],
                         (step + 1 - start) * cfg["batch_size"] / max(time.time() - t0, 1e-9))
        if (step + 1) % cfg["checkpoint_every"] == 0 and not last:
            _save_checkpoint(ckpt, {"step": step + 1, "runs": {run.regime: run.state() for run in runs},
                                    "fingerprint": fingerprint})
    for run in runs:
        _write_sae(run, layer, base_sae, train_paths, store, lr, seed, fingerprint)
    shutil.rmtree(checkpoint_dir, ignore_errors=True)
    with contextlib.suppress(OSError):  # and the per-layer folders above it, once empty
        os.removedirs(Path(checkpoint_dir).parent)


def _train_step(run: Run, x: torch.Tensor, step: int, n_tokens: int) -> None:
    sae = run.sae
    v, i = sae.encode(x)
    loss = sae.normalised_mse(x, sae.decode(v, i))
    run.opt.zero_grad(set_to_none=True)
    loss.backward()
    run.opt.step()
    run.seen += n_tokens
    active = i[v > 0]
    run.last_fired[active] = run.seen
    run.fires += torch.bincount(active, minlength=sae.d_sae)
    run.sum_loss, run.n_loss = run.sum_loss + loss.detach(), run.n_loss + 1
    run.first_bad = torch.where((run.first_bad < 0) & ~torch.isfinite(loss.detach()), step, run.first_bad)


def _write_sae(run: Run, layer: int, base_sae, train_paths, store: StoreParts, lr: float, seed: int,
               fingerprint: str) -> None:
    sae = run.sae
    meta = {"layer": layer, "regime": run.regime, "base_sae": str(base_sae), "store": [str(p) for p in train_paths],
            "d_model": sae.d_model, "d_sae": sae.d_sae, "top_k": sae.k, "scale": float(sae.scale),
            "dataset_average_activation_norm": math.sqrt(sae.d_model) / float(sae.scale),
            "rank_by_decoder_norm": sae.rank_by_decoder_norm, "tokens": run.seen, "lr": lr,
            "seed": seed, "hook_name": f"blocks.{layer}.hook_resid_post", "fingerprint": fingerprint}
    with atomic_dir(run.out) as tmp:
        save_sae(sae, tmp, meta)
        pd.DataFrame(run.curve).to_parquet(Path(tmp) / "curve.parquet", index=False)
        pd.DataFrame({"feature": range(sae.d_sae), "training_fires": run.fires.cpu().numpy(),
                      "last_fired_tokens": run.last_fired.cpu().numpy()}).to_parquet(Path(tmp) / "features.parquet",
                                                                                       index=False)
        save_saelens(sae, Path(tmp) / "saelens", meta["hook_name"], str(store.attrs.get("model", "")))


def _curve_row(sae, heldout, tokens: int, loss: float, last_fired: torch.Tensor, step: int, cfg: dict) -> dict:
    s = evaluate(sae, heldout).summary()
    dead = ((tokens - last_fired) > cfg["dead_tokens"]).float().mean().item() if tokens > cfg["dead_tokens"] else 0.0
    return {"step": step, "tokens_seen": tokens, "loss": loss, "fvu": s["fvu"], "l0": s["l0"],
            "dead_fraction": dead}


def _refuse_nonfinite(first_bad: torch.Tensor, sae: TopKSAE, stream: TokenStream, what: str, ckpt: Path) -> None:
    """Stop with the step and its rows if a loss or a weight went NaN/Inf (one host sync)."""
    weights_ok = torch.isfinite(torch.stack([p.detach().sum() for p in sae.parameters()])).all()
    bad = int(first_bad)
    if bad < 0 and bool(weights_ok):
        return
    where = f"non-finite loss at step {bad} ({stream.describe(bad)})" if bad >= 0 else "non-finite weights"
    kept = f"{ckpt} holds the last finite state" if ckpt.is_file() else "no checkpoint was written"
    raise FloatingPointError(f"{what}: {where}; nothing written ({kept}); lower sae_finetune.lr or check the cache")


def _save_checkpoint(path: Path, state: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    if path.exists():
        os.replace(path, path.with_name(PREVIOUS))
    os.replace(tmp, path)  # atomic: a kill leaves the previous checkpoint or the new one


def _load_checkpoint(folder: Path, fingerprint: str) -> dict | None:
    """The newest checkpoint that loads and was written for these settings; None: start afresh."""
    for path in (folder / CHECKPOINT, folder / PREVIOUS):
        if not path.is_file():
            continue
        try:
            state = torch.load(path, weights_only=True, map_location="cpu")
        except Exception as e:  # noqa: BLE001 - any damage (truncated, bit rot) means: not usable
            log.warning("%s does not load (%s): ignored", path, " ".join(str(e).split())[:200])
            continue
        if state.get("fingerprint") != fingerprint:
            log.warning("%s was written for other settings: ignored", path)
            continue
        return state
    return None


def save_sae(sae: TopKSAE, folder: str | Path, meta: dict) -> None:
    """``sae.safetensors`` (rows = features, normalised space) + ``cfg.json``."""
    folder = Path(folder)
    save_file({k: v.detach().contiguous() for k, v in sae.state_dict().items()}, folder / "sae.safetensors")
    (folder / "cfg.json").write_text(json.dumps(meta, indent=2, sort_keys=True))


def load_sae(folder: str | Path, device: torch.device | str = "cpu") -> TopKSAE:
    """A fine-tuned SAE, float32 on ``device``."""
    folder = Path(folder)
    for name in ("cfg.json", "sae.safetensors"):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"SAE file missing: {folder / name}")
    meta = read_json(folder / "cfg.json")
    sae = TopKSAE(meta["d_model"], meta["d_sae"], meta["top_k"], meta["scale"], meta["rank_by_decoder_norm"])
    sae.load_state_dict(read_safetensors(folder / "sae.safetensors"))
    return place_sae(sae, device)
