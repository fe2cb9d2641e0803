"""``stagediff <stage>``: one subcommand per workflow stage.

Rules call these with ``--params`` holding exactly the settings the job depends on (JSON, or
``@file.json``), so Snakemake reruns a job only when its own settings change. Each command
writes its outputs atomically.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
from pathlib import Path

log = logging.getLogger("stagediff")


def _read_tables(paths: list[str]):
    """Per-layer Parquet tables stacked into one frame."""
    import pandas as pd

    return pd.concat([pd.read_parquet(t) for t in paths], ignore_index=True)


def _params(text: str) -> dict:
    if text.startswith("@"):
        text = Path(text[1:]).read_text()
    return json.loads(text)


def _world(p: dict):
    """The VLM on the configured device, after seeding everything."""
    from stagediff.models.vlm import load_vlm
    from stagediff.seed import pick_device, seed_everything

    seed_everything(p["seed"])
    m = p["model"]
    return load_vlm(m["vlm"], pick_device(p["device"]), m["dtype"], m["pad_to_square"])


def _has_downstream(selected, layer: int) -> bool:
    """Whether the layer has features to study; if not, a model-running job writes an empty result
    instead of loading the VLM (minutes for an 8B model)."""
    if (selected.downstream & (selected.layer == layer)).any():
        return True
    log.info("layer %d: no downstream features", layer)
    return False


def cmd_check_config(a) -> None:
    from stagediff import config

    cfg = config.load(a.config)
    print(f"{a.config}: ok ({len(cfg['layers'])} layers, world {'toy' if 'toy' in cfg else 'paper'})")


def cmd_toy_data(a) -> None:
    from stagediff.data.toy_world import generate_toy_world

    p = _params(a.params)
    generate_toy_world(a.out, p["data"], p["seed"])


def cmd_toy_base_lm(a) -> None:
    from stagediff.models.toy_lm import train_base_lm

    p = _params(a.params)
    train_base_lm(Path(a.data) / "corpus.txt", a.out, p["base_lm"], p["seed"])


def cmd_toy_base_sae(a) -> None:
    from stagediff.sae.train_base import train_base_sae

    p = _params(a.params)
    train_base_sae(a.base_lm, Path(a.data) / "corpus.txt", a.layer, a.out, p["base_sae"], p["seed"])


def cmd_toy_vlm(a) -> None:
    from stagediff.models.toy_vlm import train_toy_vlm

    p = _params(a.params)
    train_toy_vlm(a.base_lm, p["data"], p["prompts"], p["question_splits"], a.out, p["vlm"],
                  p["image_size"], p["seed"])


def cmd_plan(a) -> None:
    from stagediff.plan import plan, render

    print(render(plan(a.config, a.text_tokens, a.gpu_tflops, a.mfu)))


def cmd_convert_llava(a) -> None:
    from stagediff.models.convert import convert_llava

    convert_llava(a.checkpoint, a.vision_tower, a.out, a.dtype)


def cmd_vlm_accuracy(a) -> None:
    from stagediff.data.items import vqa_items, vsr_items
    from stagediff.evaluate_vlm import accuracy_table, predict
    from stagediff.io import write_parquet

    p = _params(a.params)
    e = p["evaluate_vlm"]
    model, processor = _world(p)
    items = (vqa_items(p["data"], e["split"], p["prompts"], p["question_splits"], e["n"], p["seed"])
             + vsr_items(p["data"], e["split"], p["prompts"], e["n"], p["seed"]))
    preds = predict(model, processor, items, e["batch_size"], e["max_new_tokens"])
    table = accuracy_table(items, preds)
    log.info("VLM accuracy (%s split):\n%s", e["split"], table.to_string(index=False))
    write_parquet(table, a.out)


def cmd_cache(a) -> None:
    from stagediff.cache import cache_activations, config_hash
    from stagediff.data.items import vqa_items

    p = _params(a.params)
    if len(a.out) != len(a.layers):
        raise SystemExit(f"--out needs one path per layer: {len(a.layers)} layers, {len(a.out)} paths")
    c = p["cache"]
    model, processor = _world(p)
    items = [it for split, n in c["splits"].items() if n
             for it in vqa_items(p["data"], split, p["prompts"], p["question_splits"], n, p["seed"])]
    attrs = {"model": p["model"]["vlm"], "dataset": c["dataset"], "dtype": c["dtype"],
             "hook": "decoder block output (resid_post)", "config_hash": config_hash(p),
             "d_model": model.config.text_config.hidden_size}
    cache_activations(model, processor, items, a.layers, dict(zip(a.layers, map(Path, a.out))),
                      c, attrs)


def cmd_sae_finetune(a) -> None:
    from stagediff.sae.finetune import finetune_sae

    p = _params(a.params)
    finetune_sae(a.cache, a.base_sae, a.regime, a.layer, a.out, a.checkpoint_dir, p["sae_finetune"], p["seed"])


def cmd_sae_evaluate(a) -> None:
    from stagediff.io import write_parquet
    from stagediff.sae.evaluate import evaluate_layer

    p = _params(a.params)
    regimes = dict(zip(p["sae_finetune"]["regimes"], a.saes))
    write_parquet(evaluate_layer(a.cache, a.layer, a.base_sae, p["sae_finetune"]["top_k"], regimes, a.base_form),
                  a.out)


def cmd_concat_tables(a) -> None:
    from stagediff.io import write_parquet

    write_parquet(_read_tables(a.tables), a.out)


def cmd_sae_figures(a) -> None:
    from stagediff.figures.fvu import fvu_figures

    fvu_figures(a.table, a.curves, a.out_dir)


def cmd_diff_layer(a) -> None:
    from stagediff.diff.adapted import feature_table
    from stagediff.io import write_parquet

    p = _params(a.params)
    regimes = dict(zip(p["sae_finetune"]["regimes"], a.saes))
    write_parquet(feature_table(a.layer, a.base_sae, p["sae_finetune"]["top_k"], regimes, a.cache, p["diff"]), a.out)


def cmd_diff_adapted(a) -> None:
    from stagediff.diff.adapted import adapted_mask, threshold_sweep
    from stagediff.io import write_parquet

    d = _params(a.params)["diff"]
    table = _read_tables(a.tables)
    table["adapted"] = adapted_mask(table, d["p_cos"], d["epsilon"])
    log.info("adapted set: %d of %d features (%.1f%%)", table.adapted.sum(), len(table), 100 * table.adapted.mean())
    write_parquet(table, a.out)
    write_parquet(threshold_sweep(table, d["sweep"]["p_cos"], d["sweep"]["epsilon"], d["p_cos"], d["epsilon"]),
                  a.sweep)


def cmd_diff_figures(a) -> None:
    import pandas as pd

    from stagediff.figures.diff import diff_figures

    d = _params(a.params)["diff"]
    diff_figures(pd.read_parquet(a.features), pd.read_parquet(a.sweep), pd.read_parquet(a.selected),
                 (d["p_cos"], d["epsilon"]), a.out_dir)


def cmd_shift_layer(a) -> None:
    from stagediff.cache import SPANS, ActivationStore
    from stagediff.data.items import vqa_items
    from stagediff.diff.shift import shift_table
    from stagediff.io import write_parquet
    from stagediff.sae.finetune import load_sae

    p = _params(a.params)
    sh = p["shift"]
    store = ActivationStore(a.cache)
    cached = set(store.meta("text", "sample_id").tolist())
    items = [it for it in vqa_items(p["data"], sh["split"], p["prompts"], p["question_splits"])
             if it.sample_id in cached]
    write_parquet(shift_table(a.layer, load_sae(a.sae), store, items, sh["split"], sh["families"],
                              SPANS[sh["tokens"]]), a.out)


def cmd_shift_candidates(a) -> None:
    from stagediff.diff.shift import mark_candidates
    from stagediff.io import write_parquet

    table = mark_candidates(_read_tables(a.tables), _params(a.params)["shift"])
    for split, n in table.groupby("split").candidate.sum().items():
        log.info("%s candidates: %d", split, n)
    write_parquet(table, a.out)


def cmd_shift_figures(a) -> None:
    import pandas as pd

    from stagediff.figures.shift import shift_figures

    shift_figures(pd.read_parquet(a.table), a.out_dir)


def cmd_neutral_layer(a) -> None:
    import pandas as pd

    from stagediff.cache import ActivationStore
    from stagediff.data.items import vqa_items
    from stagediff.diff.neutral import EVIDENCE_COLUMNS, layer_candidates, neutral_evidence, vlm_rerun
    from stagediff.io import write_parquet
    from stagediff.sae.finetune import load_sae

    p = _params(a.params)
    split = p["shift"]["split"]
    candidates = layer_candidates(pd.read_parquet(a.shift), pd.read_parquet(a.adapted), a.layer,
                                  p["neutral"]["only_adapted"])
    if candidates.empty:  # no model load (minutes for an 8B VLM) when there is nothing to test
        log.info("layer %d: no candidates", a.layer)
        write_parquet(pd.DataFrame(columns=EVIDENCE_COLUMNS), a.out)
        return
    model, processor = _world(p)
    neutral = [p["prompts"]["neutral"].format(prompt=t) for t in json.loads(Path(p["data"]["neutral_prompts"]).read_text())]
    items = vqa_items(p["data"], split, p["prompts"], p["question_splits"])
    table = neutral_evidence(vlm_rerun(model, processor, a.layer), load_sae(a.sae), a.layer, ActivationStore(a.cache),
                             items, candidates, neutral, p["neutral"], split)
    log.info("layer %d: %d candidates, %d neutral-prompt runs", a.layer, len(candidates), len(table))
    write_parquet(table, a.out)


def cmd_select_features(a) -> None:
    import pandas as pd

    from stagediff.diff.neutral import select_features
    from stagediff.io import write_parquet

    p = _params(a.params)
    evidence = _read_tables(a.evidence)
    sel = select_features(pd.read_parquet(a.shift), pd.read_parquet(a.adapted), evidence, p["neutral"],
                          p["selection"]["top_n"])
    for split, n in sel.groupby("split").size().items():
        log.info("%s features selected: %d (downstream: %d)", split, n, min(n, p["selection"]["top_n"]))
    write_parquet(evidence, a.evidence_out)
    write_parquet(sel, a.out)


def cmd_autointerp_examples(a) -> None:
    import pandas as pd

    from stagediff.autointerp.examples import layer_examples
    from stagediff.data.items import vqa_items, vsr_items
    from stagediff.io import write_json
    from stagediff.sae.finetune import load_sae

    p = _params(a.params)
    ai = p["autointerp"]
    selected = pd.read_parquet(a.selected)
    if not _has_downstream(selected, a.layer):
        write_json({"layer": a.layer, "features": []}, a.out)
        return
    model, processor = _world(p)
    split = ai["pool"]["split"]
    items = (vqa_items(p["data"], split, p["prompts"], p["question_splits"], ai["pool"]["vqa"], p["seed"])
             + vsr_items(p["data"], split, p["prompts"], ai["pool"]["vsr"], p["seed"]))
    ex = layer_examples(model, processor, load_sae(a.sae), a.layer, selected, items, ai, p["seed"])
    log.info("layer %d: examples for %d features from %d pool samples", a.layer, len(ex["features"]), len(items))
    write_json(ex, a.out)


def cmd_autointerp_describe(a) -> None:
    from stagediff.autointerp.describe import describe_layer
    from stagediff.io import write_parquet

    p = _params(a.params)
    ai = p["autointerp"]
    examples = json.loads(Path(a.examples).read_text())
    write_parquet(describe_layer(examples, ai, ai["cache_dir"], p["seed"], a.out_dir, p["pad_to_square"]), a.summary)


def cmd_autointerp_figures(a) -> None:
    from stagediff.figures.autointerp import autointerp_figures

    autointerp_figures(a.dirs, a.out_dir, _params(a.params)["pad_to_square"])


def cmd_patching_mean(a) -> None:
    from safetensors.torch import save_file

    from stagediff.data.items import vqa_items
    from stagediff.io import atomic_file
    from stagediff.patching.heads import mean_visual_embedding

    p = _params(a.params)
    pc = p["patching"]
    model, processor = _world(p)
    items = vqa_items(p["data"], "train", p["prompts"], p["question_splits"], pc["mean_samples"], p["seed"])
    mean = mean_visual_embedding(model, processor, items, pc["mean_per_position"])
    log.info("mean visual embedding over %d training questions' images: shape %s", len(items), tuple(mean.shape))
    with atomic_file(a.out) as tmp:
        save_file({"mean": mean.contiguous()}, str(tmp), metadata={"n_items": str(len(items))})


def cmd_patching_layer(a) -> None:
    import pandas as pd
    from safetensors.torch import load_file

    from stagediff.cache import ActivationStore
    from stagediff.data.items import vqa_items
    from stagediff.io import atomic_dir, write_parquet
    from stagediff.patching.layer import patching_layer
    from stagediff.sae.finetune import load_sae

    p = _params(a.params)
    selected = pd.read_parquet(a.selected)
    if not _has_downstream(selected, a.layer):
        with atomic_dir(a.out_dir):
            pass
        write_parquet(pd.DataFrame(), a.scores)
        write_parquet(pd.DataFrame(), a.validation)
        return
    model, processor = _world(p)
    split = p["shift"]["split"]
    items = vqa_items(p["data"], split, p["prompts"], p["question_splits"])
    scores, val = patching_layer(model, processor, load_sae(a.sae), a.layer, ActivationStore(a.cache), items,
                                 selected, load_file(a.mean)["mean"], p["patching"], split, a.out_dir)
    write_parquet(scores, a.scores)
    write_parquet(val, a.validation)


def cmd_ablation_layer(a) -> None:
    import pandas as pd

    from stagediff.data.items import vqa_items, vsr_items
    from stagediff.data.vqav2 import subsample
    from stagediff.io import write_parquet
    from stagediff.patching.ablation import ablation_layer
    from stagediff.sae.finetune import load_sae

    p = _params(a.params)
    ab = p["ablation"]
    selected = pd.read_parquet(a.selected)
    if not _has_downstream(selected, a.layer):
        write_parquet(pd.DataFrame(), a.out)
        return
    model, processor = _world(p)
    vsr_pool = vsr_items(p["data"], ab["pool_split"], p["prompts"])
    vsr_eval = vsr_items(p["data"], ab["split"], p["prompts"])
    yes_no = subsample([it for it in vqa_items(p["data"], ab["split"], p["prompts"], p["question_splits"])
                        if it.answer_type == "yes/no"], ab["max_vqa"], p["seed"])  # seeded, not the first N
    rows = ablation_layer(model, processor, load_sae(a.sae), a.layer, selected, vsr_pool, vsr_eval, yes_no, ab)
    write_parquet(rows, a.out)


def cmd_ablation_table(a) -> None:
    from stagediff.io import atomic_file, write_parquet
    from stagediff.patching.ablation import render, summarise

    p = _params(a.params)
    per_seed = _read_tables(a.tables)
    table = summarise(per_seed)
    md, tex = render(table, p["ablation"]["table_top_n"])
    write_parquet(per_seed, a.per_seed)
    write_parquet(table, a.out)
    for text, path in ((md, a.markdown), (tex, a.latex)):
        with atomic_file(path) as tmp:
            tmp.write_text(text)


def cmd_patching_figures(a) -> None:
    from stagediff.figures.patching import patching_figures

    p = _params(a.params)
    patching_figures(_read_tables(a.scores), a.dirs, p["patching"], a.out_dir, p["pad_to_square"])


def _visual_setup(p: dict):
    """The VLM and the object records of ``visual.split`` (COCO-format instances, same images as VQAv2)."""
    from stagediff.visual.experiments import load_questions, object_records

    model, processor = _world(p)
    v = p["visual"]
    subtype = p["data"]["vqav2"]["subtypes"][v["split"]]
    grid = int(model.config.image_seq_length ** 0.5)
    records = object_records(Path(p["data"]["coco"]["root"]) / f"instances_{subtype}.json",
                             Path(p["data"]["vqav2"]["images"]) / subtype, v, p["seed"], grid,
                             processor.pad_to_square, load_questions(v["questions"]))
    log.info("%d objects in %d %s images", len(records), len({r.image_id for r in records}), v["split"])
    return model, processor, records, grid


def cmd_visual_ablation(a) -> None:
    from safetensors.torch import load_file

    from stagediff.io import write_parquet
    from stagediff.visual.experiments import token_ablation, token_sets

    p = _params(a.params)
    model, processor, records, grid = _visual_setup(p)
    mean = load_file(a.mean)["mean"]
    sets = token_sets(model, processor, records, p["visual"], p["prompts"], mean, grid, p["seed"])
    write_parquet(token_ablation(model, processor, records, sets, p["visual"], p["prompts"], mean, p["seed"]), a.out)


def cmd_visual_logit_lens(a) -> None:
    from stagediff.io import write_json, write_parquet
    from stagediff.visual.experiments import logit_lens_table

    p = _params(a.params)
    model, processor, records, _ = _visual_setup(p)
    table, maps = logit_lens_table(model, processor, records, p["prompts"], p["visual"])
    best = table.groupby("layer").fraction.mean()
    log.info("logit lens: object-patch share decoding to the class word per layer %s; best layer %d",
             best.round(3).to_dict(), int(best.idxmax()))
    write_parquet(table, a.out)
    write_json(maps, a.maps)


def cmd_visual_knockout(a) -> None:
    from stagediff.io import write_parquet
    from stagediff.visual.experiments import knockout_table

    p = _params(a.params)
    model, processor, records, grid = _visual_setup(p)
    write_parquet(knockout_table(model, processor, records, p["visual"], p["prompts"], grid), a.out)


def cmd_visual_figures(a) -> None:
    import pandas as pd

    from stagediff.figures.visual import visual_figures

    visual_figures(pd.read_parquet(a.ablation), pd.read_parquet(a.logit_lens), json.loads(Path(a.maps).read_text()),
                   pd.read_parquet(a.knockout), a.out_dir, _params(a.params)["pad_to_square"])


# subcommand: (function, help, options); an option is a name or (name, argparse kwargs)
COMMANDS = {
    "check-config": (cmd_check_config, "validate a config file and print a summary", [("config", {})]),
    "toy-data": (cmd_toy_data, "generate the toy images and VQAv2/VSR/COCO files", ["--params", "--out"]),
    "toy-base-lm": (cmd_toy_base_lm, "train the toy base LM (text only) and its tokenizer",
                    ["--params", "--data", "--out"]),
    "toy-base-sae": (cmd_toy_base_sae, "train one layer's base TopK SAE, Llama Scope layout",
                     ["--params", "--data", "--base-lm", ("--layer", {"type": int, "required": True}), "--out"]),
    "toy-vlm": (cmd_toy_vlm, "visual-instruction-tune the toy LLaVA from the base LM",
                ["--params", "--base-lm", "--out"]),
    "plan": (cmd_plan, "jobs per rule, cache size per layer and GPU-hours of a config, before running it",
             [("config", {}), ("--text-tokens", {"type": int, "default": 20, "help": "text tokens per sample"}),
              ("--gpu-tflops", {"type": float, "default": 989.0, "help": "peak (H100 bf16 dense: 989)"}),
              ("--mfu", {"type": float, "default": 0.4, "help": "utilisation of the peak"})]),
    "convert-llava": (cmd_convert_llava, "original LLaVA(-MORE) checkpoint -> HF LlavaForConditionalGeneration",
                      ["--checkpoint", "--vision-tower", "--out",
                       ("--dtype", {"choices": ["float32", "float16", "bfloat16"], "default": "bfloat16"})]),
    "vlm-accuracy": (cmd_vlm_accuracy, "held-out VLM accuracy per question family (Parquet)", ["--params", "--out"]),
    "cache": (cmd_cache, "cache residual activations of a layer group to Zarr (one forward)",
              ["--params", ("--layers", {"type": int, "nargs": "+", "required": True}),
               ("--out", {"nargs": "+", "required": True, "help": "one store path per layer, same order"})]),
    "sae-finetune": (cmd_sae_finetune, "warm-start (or randomly init) one layer's SAE under one regime",
                     ["--params", "--cache", "--base-sae", ("--layer", {"type": int, "required": True}),
                      ("--regime", {"required": True}), "--checkpoint-dir", "--out"]),
    "sae-evaluate": (cmd_sae_evaluate, "held-out FVU/L0/dead per regime x modality for one layer (Parquet)",
                     ["--params", "--cache", "--base-sae", ("--layer", {"type": int, "required": True}),
                      ("--saes", {"nargs": "+", "required": True, "help": "one SAE folder per regime, config order"}),
                      ("--base-form", {"choices": ["topk", "jumprelu"], "default": "topk",
                                       "help": "base rows: the paper's TopK or the release's JumpReLU"}),
                      "--out"]),
    "concat-tables": (cmd_concat_tables, "stack per-layer Parquet tables into one",
                      [("tables", {"nargs": "+"}), "--out"]),
    "sae-figures": (cmd_sae_figures, "Fig 1 and Fig 6 (PNG + PDF) and the FVU summary table",
                    ["--table", ("--curves", {"nargs": "+", "required": True}), "--out-dir"]),
    "diff-layer": (cmd_diff_layer, "per-feature decoder cosine, visual energy, firing rates for one layer",
                   ["--params", "--cache", "--base-sae", ("--layer", {"type": int, "required": True}),
                    ("--saes", {"nargs": "+", "required": True, "help": "one SAE folder per regime, config order"}),
                    "--out"]),
    "diff-adapted": (cmd_diff_adapted, "the global adapted set and the (p_cos, epsilon) threshold sweep",
                     ["--params", ("tables", {"nargs": "+"}), "--out", "--sweep"]),
    "diff-figures": (cmd_diff_figures, "Fig 2, 5, 7, 8 (PNG + PDF)",
                     ["--params", "--features", "--sweep", "--selected", "--out-dir"]),
    "shift-layer": (cmd_shift_layer, "firing frequency, delta p, odds ratio, p-value per feature and split, one layer",
                    ["--params", "--cache", "--sae", ("--layer", {"type": int, "required": True}), "--out"]),
    "shift-candidates": (cmd_shift_candidates, "multiple-comparison correction and the candidate flag",
                         ["--params", ("tables", {"nargs": "+"}), "--out"]),
    "shift-figures": (cmd_shift_figures, "Fig 9 (spatial) and Fig 10 (OCR), PNG + PDF", ["--table", "--out-dir"]),
    "neutral-layer": (cmd_neutral_layer, "neutral-prompt filter: rerun top samples of one layer's candidates",
                      ["--params", "--cache", "--sae", "--shift", "--adapted",
                       ("--layer", {"type": int, "required": True}), "--out"]),
    "select-features": (cmd_select_features, "candidates ∩ neutral survivors ∩ adapted, ranked; top-N downstream",
                        ["--params", "--shift", "--adapted", ("--evidence", {"nargs": "+", "required": True}),
                         "--evidence-out", "--out"]),
    "autointerp-examples": (cmd_autointerp_examples, "top-activating samples, held-out positives, negatives per feature",
                            ["--params", "--sae", "--selected", ("--layer", {"type": int, "required": True}), "--out"]),
    "autointerp-describe": (cmd_autointerp_describe, "describe each feature (LLM or offline) and validate it (F1)",
                            ["--params", "--examples", "--out-dir", "--summary"]),
    "autointerp-figures": (cmd_autointerp_figures, "Fig 3-style panels: top samples, activations, description",
                           ["--params", ("dirs", {"nargs": "+"}), "--out-dir"]),
    "patching-mean": (cmd_patching_mean, "the mean visual-token embedding (the corrupt run's input)",
                      ["--params", "--out"]),
    "patching-layer": (cmd_patching_layer, "attribution patching (Methods A, B; exact check) of a layer's features",
                       ["--params", "--cache", "--sae", "--selected", "--mean", ("--layer", {"type": int, "required": True}),
                        "--out-dir", "--scores", "--validation"]),
    "ablation-layer": (cmd_ablation_layer, "ablate each downstream feature of a layer: VSR, VQA, random controls",
                       ["--params", "--sae", "--selected", ("--layer", {"type": int, "required": True}), "--out"]),
    "ablation-table": (cmd_ablation_table, "Tables 1 and 2 (Parquet, Markdown, LaTeX) from the per-layer rows",
                       ["--params", ("tables", {"nargs": "+"}), "--per-seed", "--out", "--markdown", "--latex"]),
    "patching-figures": (cmd_patching_figures, "Fig 13, 14, 15/16 and head recurrence (Fig 4 idea)",
                         ["--params", ("--scores", {"nargs": "+", "required": True}),
                          ("--dirs", {"nargs": "+", "required": True}), "--out-dir"]),
    "visual-ablation": (cmd_visual_ablation, "Neo et al. Table 1: mean-ablate object/buffer/register/IG/random tokens",
                        ["--params", "--mean", "--out"]),
    "visual-logit-lens": (cmd_visual_logit_lens, "logit lens on visual tokens: class-word share per layer",
                          ["--params", "--out", "--maps"]),
    "visual-knockout": (cmd_visual_knockout, "Neo et al. Table 2: attention knockout between token groups",
                        ["--params", "--out"]),
    "visual-figures": (cmd_visual_figures, "token-ablation, logit-lens and knockout figures and Markdown tables",
                       ["--params", "--ablation", "--logit-lens", "--maps", "--knockout", "--out-dir"]),
}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="stagediff", description=__doc__.splitlines()[0])
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--log", help="append the job's log (and a failure's traceback) to this file; "
                                      "stderr then gets only a failure's one-line message")
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name, (fn, help_, options) in COMMANDS.items():
        s = sub.add_parser(name, help=help_, parents=[common])
        s.set_defaults(fn=fn)
        for opt in options:
            opt_name, kw = opt if isinstance(opt, tuple) else (opt, {"required": True})
            s.add_argument(opt_name, **kw)

    a = ap.parse_args(argv)
    err = sys.stderr
    if a.log:  # everything a job prints (warnings, progress bars, C++ messages) goes to its log, as
        # `2> log` did; the terminal keeps only a failure's one line
        err = os.fdopen(os.dup(2), "w")
        sys.stderr.flush()
        os.dup2(os.open(a.log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644), 2)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    # Where the job ran, first in every rule log: on a cluster this says which SLURM job and which
    # GPUs (CUDA_VISIBLE_DEVICES) it was given.
    log.info("stagediff %s on %s (SLURM job %s, CUDA_VISIBLE_DEVICES=%s)", a.cmd, platform.node(),
             os.environ.get("SLURM_JOB_ID", "-"), os.environ.get("CUDA_VISIBLE_DEVICES", "-"))
    try:
        a.fn(a)
    except Exception as e:  # noqa: BLE001 - every failure ends the same way: traceback logged, one line out
        log.error("stagediff %s failed", a.cmd, exc_info=True)
        print(f"stagediff {a.cmd}: error: {one_line(e)}" + (f" (traceback in {a.log})" if a.log else ""),
              file=err, flush=True)
        sys.exit(1)


def one_line(e: BaseException) -> str:
    """The exception as one line; a message that names no file gets its type in front."""
    text = " ".join(str(e).split()) or type(e).__name__
    return text if isinstance(e, (OSError, ValueError)) else f"{type(e).__name__}: {text}"


if __name__ == "__main__":
    main()
