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

from stagediff.io import read_json, read_safetensors

log = logging.getLogger("stagediff")


def _read_tables(paths: list[str]):
    """Per-layer Parquet tables stacked into one frame. A layer with nothing to study writes its
    table empty, with the columns but no dtypes; stacked with the others it would turn every
    column to object (pandas), so empty tables only stand in when all are empty."""
    import pandas as pd

    frames = [pd.read_parquet(t) for t in paths]
    return pd.concat([f for f in frames if len(f)] or frames[:1], ignore_index=True)


def _params(text: str) -> dict:
    if text.startswith("@"):
        text = Path(text[1:]).read_text()
    return json.loads(text)


def _world(p: dict, device: str):
    """The VLM on ``device`` (``--device``, not a param: moving a job to a GPU changes no result
    beyond float rounding, so it never makes a finished job stale), after seeding everything."""
    from stagediff.device import pick_device
    from stagediff.models.vlm import load_vlm
    from stagediff.seed import seed_everything

    seed_everything(p["seed"])
    m = p["model"]
    return load_vlm(m["vlm"], pick_device(device), m["dtype"], m["pad_to_square"])


def _sae_device(a):
    from stagediff.device import pick_device

    return pick_device(a.device)


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
    from stagediff.models.toy_lm import corpus_lines
    from stagediff.models.toy_vlm import train_toy_vlm

    p = _params(a.params)
    train_toy_vlm(a.base_lm, p["data"], p["prompts"], a.out, p["vlm"], p["image_size"], p["seed"],
                  text=corpus_lines(a.corpus, p["drift_lines"], rest=True))


def cmd_toy_drift(a) -> None:
    from stagediff.io import write_parquet
    from stagediff.models.drift import lm_drift
    from stagediff.models.toy_lm import corpus_lines

    write_parquet(lm_drift(a.base_lm, a.vlm, corpus_lines(a.corpus, a.lines), a.layers), a.out)


def cmd_demo_summary(a) -> None:
    from stagediff.summary import demo_summary

    print(demo_summary(a.tables))


def cmd_plan(a) -> None:
    from stagediff.plan import plan, render

    print(render(plan(a.config, a.gpu_mem, a.disk_gbps)))


def cmd_convert_llava(a) -> None:
    from stagediff.models.convert import convert_llava

    convert_llava(a.checkpoint, a.vision_tower, a.out, a.dtype)


def cmd_vlm_accuracy(a) -> None:
    from stagediff.data.items import vqa_items, vsr_items
    from stagediff.evaluate_vlm import accuracy_table, predict
    from stagediff.io import write_parquet

    p = _params(a.params)
    e = p["evaluate_vlm"]
    model, processor = _world(p, a.device)
    items = (vqa_items(p["data"], e["split"], p["prompts"], p["question_splits"], e["n"], p["seed"])
             + vsr_items(p["data"], e["split"], p["prompts"], e["n"], p["seed"]))
    preds = predict(model, processor, items, e["batch_size"], e["max_new_tokens"])
    table = accuracy_table(items, preds)
    log.info("VLM accuracy (%s split):\n%s", e["split"], table.to_string(index=False))
    write_parquet(table, a.out)


def cmd_cache(a) -> None:
    from stagediff.cache import cache_activations, config_hash
    from stagediff.data.items import shard_items, vqa_items

    p = _params(a.params)
    if (a.part == 0) != bool(a.out):
        raise ValueError("stagediff cache: --out (the held-out stores) goes with --part 0, and only with it")
    _same_length(a, "layers", *(["out"] if a.out else []), *(["train_out"] if a.train_out else []))
    c = p["cache"]
    model, processor = _world(p, a.device)
    # question families are not cached (stages that need them read them from the questions), so
    # editing a keyword list never reruns the cache
    items = [it for split, n in c["splits"].items() if n
             for it in vqa_items(p["data"], split, p["prompts"], {}, n, p["seed"])]
    items = shard_items(items, c["sample_shards"], a.part)
    attrs = {"model": p["model"]["vlm"], "dataset": c["dataset"], "dtype": c["dtype"],
             "hook": "decoder block output (resid_post)", "config_hash": config_hash(p),
             "d_model": model.config.text_config.hidden_size, "part": a.part, "parts": c["sample_shards"]}
    train = dict(zip(a.layers, map(Path, a.train_out))) if a.train_out else None
    cache_activations(model, processor, items, a.layers, dict(zip(a.layers, map(Path, a.out or []))), c, attrs,
                      train, a.workers)


def cmd_sae_finetune(a) -> None:
    from stagediff.sae.finetune import finetune_saes

    p = _params(a.params)
    finetune_saes(a.cache, a.heldout or a.cache[0], a.base_sae, p["sae_finetune"]["regimes"], a.layer, a.out,
                  a.checkpoint_dir, p["sae_finetune"], p["seed"], _sae_device(a), a.read_ahead)


def cmd_sae_evaluate(a) -> None:
    from stagediff.io import write_parquet
    from stagediff.sae.evaluate import evaluate_layer

    p = _params(a.params)
    regimes = dict(zip(p["sae_finetune"]["regimes"], a.saes))
    write_parquet(evaluate_layer(a.cache, a.layer, a.base_sae, p["sae_finetune"]["top_k"], regimes, a.base_form,
                                 _sae_device(a)), a.out)


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
    write_parquet(feature_table(a.layer, a.base_sae, p["sae_finetune"]["top_k"], regimes, a.cache, p["diff"],
                                _sae_device(a)), a.out)


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
    write_parquet(shift_table(a.layer, load_sae(a.sae, _sae_device(a)), store, items, sh["split"], sh["families"],
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


def cmd_neutral(a) -> None:
    """Every layer's neutral-prompt filter in one job: one VLM load, none if no layer has candidates."""
    import pandas as pd

    from stagediff.cache import ActivationStore
    from stagediff.data.items import vqa_items
    from stagediff.device import model_device
    from stagediff.diff.neutral import EVIDENCE_COLUMNS, layer_candidates, neutral_evidence, vlm_rerun
    from stagediff.io import write_parquet
    from stagediff.sae.finetune import load_sae

    _same_length(a, "layers", "caches", "saes", "out")
    p = _params(a.params)
    split = p["shift"]["split"]
    shift, adapted = pd.read_parquet(a.shift), pd.read_parquet(a.adapted)
    model = None
    for layer, cache, sae, out in zip(a.layers, a.caches, a.saes, a.out):
        candidates = layer_candidates(shift, adapted, layer, p["neutral"]["only_adapted"])
        if candidates.empty:
            log.info("layer %d: no candidates", layer)
            write_parquet(pd.DataFrame(columns=EVIDENCE_COLUMNS), out)
            continue
        if model is None:
            model, processor = _world(p, a.device)
            neutral = [p["prompts"]["neutral"].format(prompt=t)
                       for t in read_json(Path(p["data"]["neutral_prompts"]))]
            items = vqa_items(p["data"], split, p["prompts"], p["question_splits"])
        table = neutral_evidence(vlm_rerun(model, processor, layer), load_sae(sae, model_device(model)), layer,
                                 ActivationStore(cache), items, candidates, neutral, p["neutral"], split)
        log.info("layer %d: %d candidates, %d neutral-prompt runs", layer, len(candidates), len(table))
        write_parquet(table, out)


def _same_length(a, *names: str) -> None:
    lengths = {n: len(getattr(a, n)) for n in names}
    if len(set(lengths.values())) != 1:
        raise SystemExit(f"--{' --'.join(names)} need one entry per layer each: got {lengths}")


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


def cmd_autointerp_describe(a) -> None:
    from stagediff.autointerp.describe import describe_layer
    from stagediff.io import write_parquet

    p = _params(a.params)
    ai = p["autointerp"]
    examples = read_json(Path(a.examples))
    write_parquet(describe_layer(examples, ai, ai["cache_dir"], p["seed"], a.out_dir, p["pad_to_square"]), a.summary)


def cmd_autointerp_figures(a) -> None:
    from stagediff.figures.autointerp import autointerp_figures

    autointerp_figures(a.dirs, a.out_dir, _params(a.params)["pad_to_square"])


def cmd_study_layer(a) -> None:
    """Everything that studies one layer's downstream features with the VLM, on one model load:
    auto-interp examples, attribution patching, ablation. A layer with none loads nothing and
    writes its outputs empty (with their columns)."""
    import pandas as pd

    from stagediff.io import atomic_dir, write_json, write_parquet
    from stagediff.patching.ablation import ROW_COLUMNS
    from stagediff.patching.layer import SCORE_COLUMNS, validation_columns

    p = _params(a.params)
    selected = pd.read_parquet(a.selected)
    if not _has_downstream(selected, a.layer):
        write_json({"layer": a.layer, "features": []}, a.examples)
        with atomic_dir(a.patching_dir):
            pass
        write_parquet(pd.DataFrame(columns=SCORE_COLUMNS), a.scores)
        write_parquet(pd.DataFrame(columns=validation_columns(p["patching"])), a.validation)
        write_parquet(pd.DataFrame(columns=ROW_COLUMNS), a.ablation)
        return
    from stagediff.device import model_device
    from stagediff.sae.finetune import load_sae

    model, processor = _world(p, a.device)
    sae = load_sae(a.sae, model_device(model))  # float32 beside the model (bf16 in the paper world)
    write_json(_autointerp_examples(p, model, processor, sae, selected, a.layer), a.examples)
    scores, validation = _patching(p, model, processor, sae, selected, a)
    write_parquet(scores, a.scores)
    write_parquet(validation, a.validation)
    write_parquet(_ablation(p, model, processor, sae, selected, a.layer), a.ablation)


def _autointerp_examples(p: dict, model, processor, sae, selected, layer: int) -> dict:
    from stagediff.autointerp.examples import layer_examples
    from stagediff.data.items import vqa_items, vsr_items

    ai = p["autointerp"]
    split = ai["pool"]["split"]
    items = (vqa_items(p["data"], split, p["prompts"], p["question_splits"], ai["pool"]["vqa"], p["seed"])
             + vsr_items(p["data"], split, p["prompts"], ai["pool"]["vsr"], p["seed"]))
    ex = layer_examples(model, processor, sae, layer, selected, items, ai, p["seed"])
    log.info("layer %d: examples for %d features from %d pool samples", layer, len(ex["features"]), len(items))
    return ex


def _patching(p: dict, model, processor, sae, selected, a):
    from stagediff.cache import ActivationStore
    from stagediff.data.items import vqa_items
    from stagediff.patching.layer import patching_layer

    split = p["shift"]["split"]
    items = vqa_items(p["data"], split, p["prompts"], p["question_splits"])
    return patching_layer(model, processor, sae, a.layer, ActivationStore(a.cache), items, selected,
                          read_safetensors(a.mean)["mean"], p["patching"], split, a.patching_dir)


def _ablation(p: dict, model, processor, sae, selected, layer: int):
    from stagediff.data.items import vqa_items, vsr_items
    from stagediff.data.vqav2 import subsample
    from stagediff.patching.ablation import ablation_layer

    ab = p["ablation"]
    vsr_pool = vsr_items(p["data"], ab["pool_split"], p["prompts"])
    vsr_eval = vsr_items(p["data"], ab["split"], p["prompts"])
    yes_no = subsample([it for it in vqa_items(p["data"], ab["split"], p["prompts"], p["question_splits"])
                        if it.answer_type == "yes/no"], ab["max_vqa"], p["seed"])  # seeded, not the first N
    return ablation_layer(model, processor, sae, layer, selected, vsr_pool, vsr_eval, yes_no, ab)


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


def cmd_visual_tokens(a) -> None:
    """Neo et al. on one model load: the mean visual embedding (also patching's corrupt input),
    token ablation (Table 1), the logit lens, attention knockout (Table 2)."""
    from safetensors.torch import save_file

    from stagediff.data.items import vqa_items
    from stagediff.io import atomic_file, write_json, write_parquet
    from stagediff.patching.heads import mean_visual_embedding
    from stagediff.visual.experiments import (knockout_table, load_questions, logit_lens_table, object_records,
                                              token_ablation, token_sets)

    p = _params(a.params)
    pc, v = p["patching"], p["visual"]
    model, processor = _world(p, a.device)
    items = vqa_items(p["data"], "train", p["prompts"], {}, pc["mean_samples"], p["seed"])  # families unused
    mean = mean_visual_embedding(model, processor, items, pc["mean_per_position"])
    log.info("mean visual embedding over %d training questions' images: shape %s", len(items), tuple(mean.shape))
    with atomic_file(a.mean) as tmp:
        save_file({"mean": mean.contiguous()}, str(tmp), metadata={"n_items": str(len(items))})

    subtype = p["data"]["vqav2"]["subtypes"][v["split"]]
    grid = int(model.config.image_seq_length ** 0.5)
    records = object_records(Path(p["data"]["coco"]["root"]) / f"instances_{subtype}.json",
                             Path(p["data"]["vqav2"]["images"]) / subtype, v, p["seed"], grid,
                             processor.pad_to_square, load_questions(v["questions"]))
    log.info("%d objects in %d %s images", len(records), len({r.image_id for r in records}), v["split"])
    sets = token_sets(model, processor, records, v, p["prompts"], mean, grid, p["seed"])
    write_parquet(token_ablation(model, processor, records, sets, v, p["prompts"], mean, p["seed"]), a.ablation)
    table, maps = logit_lens_table(model, processor, records, p["prompts"], v)
    best = table.groupby("layer").fraction.mean()
    log.info("logit lens: object-patch share decoding to the class word per layer %s; best layer %d",
             best.round(3).to_dict(), int(best.idxmax()))
    write_parquet(table, a.logit_lens)
    write_json(maps, a.maps)
    write_parquet(knockout_table(model, processor, records, v, p["prompts"], grid), a.knockout)


def cmd_visual_figures(a) -> None:
    import pandas as pd

    from stagediff.figures.visual import visual_figures

    visual_figures(pd.read_parquet(a.ablation), pd.read_parquet(a.logit_lens), read_json(Path(a.maps)),
                   pd.read_parquet(a.knockout), a.out_dir, _params(a.params)["pad_to_square"])


# where a job computes: auto = CUDA when usable (rules pass the config's `device`)
DEVICE = ("--device", {"choices": ["auto", "cpu", "cuda"], "default": "auto",
                       "help": "where the model and the SAEs run (default: auto, CUDA when usable)"})
# subcommand: (function, help, options); an option is a name or (name, argparse kwargs)
COMMANDS = {
    "check-config": (cmd_check_config, "validate a config file and print a summary", [("config", {})]),
    "toy-data": (cmd_toy_data, "generate the toy images and VQAv2/VSR/COCO files", ["--params", "--out"]),
    "toy-base-lm": (cmd_toy_base_lm, "train the toy base LM (text only) and its tokenizer",
                    ["--params", "--data", "--out"]),
    "toy-base-sae": (cmd_toy_base_sae, "train one layer's base TopK SAE, Llama Scope layout",
                     ["--params", "--data", "--base-lm", ("--layer", {"type": int, "required": True}), "--out"]),
    "toy-vlm": (cmd_toy_vlm, "visual-instruction-tune the toy LLaVA from the base LM",
                ["--params", "--base-lm", "--corpus", "--out"]),
    "toy-drift": (cmd_toy_drift, "the toy VLM's LM vs its base LM on text only: residual norms, ratio, cosine",
                  ["--base-lm", "--vlm", "--corpus", ("--lines", {"type": int, "default": 64}),
                   ("--layers", {"type": int, "nargs": "+", "required": True}), "--out"]),
    "demo-summary": (cmd_demo_summary,
                     "the VLM's accuracy table and the demo's verdict (spatial/VSR bar, LM drift, base-SAE FVU)",
                     [("tables", {"help": "a run's tables folder, e.g. results/toy/tables"})]),
    "plan": (cmd_plan, "per rule: jobs, memory vs request, GPU-hours; model loads, cache passes, disk",
             [("config", {}), ("--gpu-mem", {"type": float, "default": 80.0, "help": "GPU memory in GB"}),
              ("--disk-gbps", {"type": float, "default": 1.0,
                               "help": "the nodes' scratch disk in GB/s (benchmarks/bench_stream.py measures it)"})]),
    "convert-llava": (cmd_convert_llava, "original LLaVA(-MORE) checkpoint -> HF LlavaForConditionalGeneration",
                      ["--checkpoint", "--vision-tower", "--out",
                       ("--dtype", {"choices": ["float32", "float16", "bfloat16"], "default": "bfloat16"})]),
    "vlm-accuracy": (cmd_vlm_accuracy, "held-out VLM accuracy per question family (Parquet)",
                     ["--params", DEVICE, "--out"]),
    "cache": (cmd_cache, "cache residual activations of a layer group to Zarr (one forward)",
              ["--params", DEVICE, ("--layers", {"type": int, "nargs": "+", "required": True}),
               ("--out", {"nargs": "+", "help": "one store path per layer, same order (part 0 only)"}),
               ("--train-out", {"nargs": "+", "help": "the train split's stores, one per layer (default: in --out)"}),
               ("--part", {"type": int, "default": 0, "help": "which of cache.sample_shards this job caches"}),
               ("--workers", {"type": int, "default": 0, "help": "image decoding processes (DataLoader workers)"})]),
    "sae-finetune": (cmd_sae_finetune, "warm-start (or randomly init) one layer's SAEs, one per regime of "
                     "sae_finetune.regimes, trained together on one read of the layer",
                     ["--params", DEVICE, ("--cache", {"nargs": "+", "required": True,
                                                       "help": "the layer's train store, or its parts"}),
                      ("--heldout", {"help": "the store with the val split (default: --cache)"}), "--base-sae",
                      ("--layer", {"type": int, "required": True}), "--checkpoint-dir",
                      ("--read-ahead", {"type": int, "default": 4, "help": "cache reads in flight"}),
                      ("--out", {"nargs": "+", "required": True, "help": "one SAE folder per regime, same order"})]),
    "sae-evaluate": (cmd_sae_evaluate, "held-out FVU/L0/dead per regime x modality for one layer (Parquet)",
                     ["--params", DEVICE, "--cache", "--base-sae", ("--layer", {"type": int, "required": True}),
                      ("--saes", {"nargs": "+", "required": True, "help": "one SAE folder per regime, config order"}),
                      ("--base-form", {"choices": ["topk", "jumprelu"], "default": "topk",
                                       "help": "base rows: the paper's TopK or the release's JumpReLU"}),
                      "--out"]),
    "concat-tables": (cmd_concat_tables, "stack per-layer Parquet tables into one",
                      [("tables", {"nargs": "+"}), "--out"]),
    "sae-figures": (cmd_sae_figures, "Fig 1 and Fig 6 (PNG + PDF) and the FVU summary table",
                    ["--table", ("--curves", {"nargs": "+", "required": True}), "--out-dir"]),
    "diff-layer": (cmd_diff_layer, "per-feature decoder cosine, visual energy, firing rates for one layer",
                   ["--params", DEVICE, "--cache", "--base-sae", ("--layer", {"type": int, "required": True}),
                    ("--saes", {"nargs": "+", "required": True, "help": "one SAE folder per regime, config order"}),
                    "--out"]),
    "diff-adapted": (cmd_diff_adapted, "the global adapted set and the (p_cos, epsilon) threshold sweep",
                     ["--params", ("tables", {"nargs": "+"}), "--out", "--sweep"]),
    "diff-figures": (cmd_diff_figures, "Fig 2, 5, 7, 8 (PNG + PDF)",
                     ["--params", "--features", "--sweep", "--selected", "--out-dir"]),
    "shift-layer": (cmd_shift_layer, "firing frequency, delta p, odds ratio, p-value per feature and split, one layer",
                    ["--params", DEVICE, "--cache", "--sae", ("--layer", {"type": int, "required": True}), "--out"]),
    "shift-candidates": (cmd_shift_candidates, "multiple-comparison correction and the candidate flag",
                         ["--params", ("tables", {"nargs": "+"}), "--out"]),
    "shift-figures": (cmd_shift_figures, "Fig 9 (spatial) and Fig 10 (OCR), PNG + PDF", ["--table", "--out-dir"]),
    "neutral": (cmd_neutral, "neutral-prompt filter of every layer: rerun its candidates' top samples",
                ["--params", DEVICE, "--shift", "--adapted", ("--layers", {"type": int, "nargs": "+", "required": True}),
                 ("--caches", {"nargs": "+", "required": True}), ("--saes", {"nargs": "+", "required": True}),
                 ("--out", {"nargs": "+", "required": True, "help": "one evidence table per layer, same order"})]),
    "select-features": (cmd_select_features, "candidates ∩ neutral survivors ∩ adapted, ranked; top-N downstream",
                        ["--params", "--shift", "--adapted", ("--evidence", {"nargs": "+", "required": True}),
                         "--evidence-out", "--out"]),
    "study-layer": (cmd_study_layer, "one layer's downstream features with the VLM: auto-interp examples, "
                    "attribution patching (Methods A, B; exact check), ablation (VSR, VQA, controls)",
                    ["--params", DEVICE, "--cache", "--sae", "--selected", "--mean",
                     ("--layer", {"type": int, "required": True}), "--examples", "--patching-dir", "--scores",
                     "--validation", "--ablation"]),
    "autointerp-describe": (cmd_autointerp_describe, "describe each feature (LLM or offline) and validate it (F1)",
                            ["--params", "--examples", "--out-dir", "--summary"]),
    "autointerp-figures": (cmd_autointerp_figures, "Fig 3-style panels: top samples, activations, description",
                           ["--params", ("dirs", {"nargs": "+"}), "--out-dir"]),
    "ablation-table": (cmd_ablation_table, "Tables 1 and 2 (Parquet, Markdown, LaTeX) from the per-layer rows",
                       ["--params", ("tables", {"nargs": "+"}), "--per-seed", "--out", "--markdown", "--latex"]),
    "patching-figures": (cmd_patching_figures, "Fig 13, 14, 15/16 and head recurrence (Fig 4 idea)",
                         ["--params", ("--scores", {"nargs": "+", "required": True}),
                          ("--dirs", {"nargs": "+", "required": True}), "--out-dir"]),
    "visual-tokens": (cmd_visual_tokens, "Neo et al.: mean visual embedding, token ablation (Table 1), logit lens, "
                      "attention knockout (Table 2)",
                      ["--params", DEVICE, "--mean", "--ablation", "--logit-lens", "--maps", "--knockout"]),
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
