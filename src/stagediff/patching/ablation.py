"""Feature ablation (paper §5.3, A.13, Tables 1–2).

During inference, f's unit decoder direction v is removed from the layer-L residual at text
positions only: y ← y − (yᵀv)v; image positions are left as they are. Measured per feature:

- VSR, on the relation-specific subset: the relations of the feature's ``top_vsr`` top-activating
  VSR captions (the ``n_relations`` most common), all captions with those relations in the eval
  split (at most ``max_samples``, drawn per seed): accuracy of the true/false answer and the
  probability of the correct answer's first token;
- VQAv2's yes/no questions of the eval split: the official VQA accuracy (min(1, matches/3) over
  the ten leave-one-out subsets) of the greedy first answer token;
- controls: ``n_controls`` random features of the same layer per seed, ablated the same way, their
  mean ΔVSR accuracy is ΔCtrl;
- the feature's odds ratio from the shift stage.

Answers are read from one forward (the first answer token), not a generate loop: both answers of
the toy and LLaVA-MORE's yes/no/true/false are one token, and one forward keeps the hook simple.
"""
from __future__ import annotations

import contextlib
import functools
import random
from collections import Counter

import numpy as np
import pandas as pd
import torch

from stagediff.autointerp.examples import peak_activation, pool_activations
from stagediff.data.items import Item
from stagediff.data.vqa_eval import vqa_accuracy
from stagediff.io import markdown_table
from stagediff.models.vlm import decoder_layers, first_token, iter_batches, next_token_probs, to_model, token_masks
from stagediff.patching.attribution import unit_direction, widen


@contextlib.contextmanager
def ablate_direction(model, layer: int, v: torch.Tensor | None, text_mask: torch.Tensor):
    """Inside the block, decoder block ``layer``'s output loses its component along unit ``v`` at
    the positions where ``text_mask`` [batch, seq] is true (``v`` None: no ablation)."""
    if v is None:
        yield
        return

    def hook(_m, _a, out):
        y = out[0] if isinstance(out, tuple) else out
        # the projection in (at least) float32, so a bf16 residual keeps no component along v
        # beyond the final rounding; v and the mask follow the residual's device
        wide = widen(y)
        u = v.to(wide)
        wide = wide - (wide @ u)[..., None] * u * text_mask.to(wide)[..., None]
        y = wide.to(y.dtype)
        return (y, *out[1:]) if isinstance(out, tuple) else y

    h = decoder_layers(model)[layer].register_forward_hook(hook)
    try:
        yield
    finally:
        h.remove()


@torch.no_grad()
def answer_scores(model, processor, items: list[Item], layer: int, v: torch.Tensor | None,
                  batch_size: int = 32) -> pd.DataFrame:
    """Per item: greedy first answer token, its correctness, and p(first token of the gold answer)."""
    tok = processor.tokenizer
    rows = []
    for part, b in iter_batches(processor, items, batch_size):
        b = to_model(b, model)
        with ablate_direction(model, layer, v, token_masks(b, model)[1]):
            probs = next_token_probs(model, b)
        pred = probs.argmax(-1)
        for it, p, pr in zip(part, pred.tolist(), probs):
            gold = first_token(tok, it.answer)
            word = tok.decode([p]).strip().lower()
            acc = vqa_accuracy(word, list(it.answers)) if it.family != "vsr" else float(word == it.answer)
            rows.append({"sample_id": it.sample_id, "prediction": word, "accuracy": acc,
                         "p_correct": float(pr[gold])})
    return pd.DataFrame(rows)


def relations_of_top(peak: pd.Series, relations: dict[int, str], top: int, n_relations: int) -> list[str]:
    """The ``n_relations`` most common relations among the ``top`` top-activating captions."""
    counts = Counter(relations[s] for s in peak[peak > 0].nlargest(top).index)
    return sorted(counts, key=lambda r: (-counts[r], r))[:n_relations]


def ablation_rows(model, processor, sae, layer: int, feature: int, odds_ratio: float, subset: list[Item],
                  rels: list[str], vqa_yes_no: list[Item], clean_vqa: float, cfg: dict) -> list[dict]:
    """One row per seed: Δ (ablated − clean) VSR accuracy and probability, Δ VQA accuracy, Δ Ctrl
    (``clean_vqa``: the unablated VQA accuracy, the same for every feature of the layer)."""
    d_sae = sae.W_dec.shape[0]
    v = functools.partial(unit_direction, sae)
    ablated_vqa = answer_scores(model, processor, vqa_yes_no, layer, v(feature)).accuracy.mean()
    rows = []
    for seed in cfg["seeds"]:
        rng = random.Random(seed)
        items = rng.sample(subset, min(len(subset), cfg["max_samples"]))
        clean = answer_scores(model, processor, items, layer, None)
        abl = answer_scores(model, processor, items, layer, v(feature))
        controls = [f for f in rng.sample(range(d_sae), cfg["n_controls"] + 1) if f != feature][: cfg["n_controls"]]
        ctrl = [answer_scores(model, processor, items, layer, v(c)).accuracy.mean() - clean.accuracy.mean()
                for c in controls]
        rows.append({"layer": layer, "feature": feature, "seed": seed,
                     "delta_vsr_acc": 100 * (abl.accuracy.mean() - clean.accuracy.mean()),
                     "delta_vsr_prob": abl.p_correct.mean() - clean.p_correct.mean(),
                     "delta_vqa_acc": 100 * (ablated_vqa - clean_vqa), "delta_ctrl": 100 * float(np.mean(ctrl)),
                     "vsr_or": odds_ratio, "n_samples": len(items), "relations": ", ".join(rels),
                     "vsr_acc_clean": 100 * clean.accuracy.mean(), "vqa_acc_clean": 100 * clean_vqa})
    return rows


ROW_COLUMNS = ["layer", "feature", "seed", "delta_vsr_acc", "delta_vsr_prob", "delta_vqa_acc", "delta_ctrl", "vsr_or",
               "n_samples", "relations", "vsr_acc_clean", "vqa_acc_clean"]
TABLE_COLUMNS = {"layer": "Layer", "feature": "Feature", "delta_vsr_acc": "ΔVSR Acc", "delta_vsr_prob": "ΔVSR Prob",
                 "delta_vqa_acc": "ΔVQA Acc", "delta_ctrl": "ΔCtrl", "vsr_or": "VSR OR", "n_samples": "#Samples",
                 "relations": "VSR Relations"}


def summarise(per_seed: pd.DataFrame) -> pd.DataFrame:
    """Table 2: seed means per feature, ranked by ΔVSR Acc (most negative first)."""
    if per_seed.empty:
        return pd.DataFrame(columns=list(TABLE_COLUMNS))
    g = per_seed.groupby(["layer", "feature"], as_index=False)
    t = g.agg(delta_vsr_acc=("delta_vsr_acc", "mean"), delta_vsr_prob=("delta_vsr_prob", "mean"),
              delta_vqa_acc=("delta_vqa_acc", "mean"), delta_ctrl=("delta_ctrl", "mean"), vsr_or=("vsr_or", "first"),
              n_samples=("n_samples", "max"), relations=("relations", "first"),
              delta_vsr_acc_sd=("delta_vsr_acc", "std"))
    return t.sort_values("delta_vsr_acc", kind="stable").reset_index(drop=True)


def render(table: pd.DataFrame, top_n: int) -> tuple[str, str]:
    """Markdown (Table 1: top ``top_n``; Table 2: all) and LaTeX (Table 2) renderings."""
    t2 = table[list(TABLE_COLUMNS)].rename(columns=TABLE_COLUMNS)
    t1 = t2.drop(columns=["ΔVSR Prob", "#Samples"]).head(top_n)
    md = ("Table 1. Top ablated features by ΔVSR accuracy (points).\n\n" + markdown_table(t1)
          + "\n\nTable 2. Full ablation results, seed means.\n\n" + markdown_table(t2) + "\n")
    return md, t2.to_latex(index=False, float_format="%.2f")


def ablation_layer(model, processor, sae, layer: int, selected: pd.DataFrame, vsr_pool: list[Item],
                   vsr_eval: list[Item], vqa_yes_no: list[Item], cfg: dict) -> pd.DataFrame:
    """Per-seed rows for the layer's downstream features. Relations come from the feature's top
    captions in ``vsr_pool``; the subset is drawn from ``vsr_eval`` (another split), so the
    captions that chose the relation are not the ones scored. A feature selected for both splits
    reports the spatial split's odds ratio."""
    mine = (selected[(selected.layer == layer) & selected.downstream]
            .sort_values("split", key=lambda s: s != "spatial", kind="stable").drop_duplicates("feature"))
    if mine.empty:
        return pd.DataFrame(columns=ROW_COLUMNS)
    pool = pool_activations(model, processor, sae, layer, vsr_pool, [int(f) for f in mine.feature])
    ids = [p["item"].sample_id for p in pool]
    clean_vqa = answer_scores(model, processor, vqa_yes_no, layer, None).accuracy.mean()
    relations = {it.sample_id: it.relation for it in vsr_pool}
    rows = []
    for j, r in enumerate(mine.itertuples()):
        peak = pd.Series([peak_activation(p, j) for p in pool], ids)
        rels = relations_of_top(peak, relations, cfg["top_vsr"], cfg["n_relations"])
        subset = [it for it in vsr_eval if it.relation in rels]
        if subset:
            rows += ablation_rows(model, processor, sae, layer, int(r.feature), float(r.odds_ratio), subset, rels,
                                  vqa_yes_no, clean_vqa, cfg)
    return pd.DataFrame(rows, columns=ROW_COLUMNS)
