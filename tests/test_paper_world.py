"""The paper world on files laid out as the real releases (tests/paper_mini.py): the whole DAG of
config/llava_more.yaml in bf16, its test config, its CLI errors and its token text."""
import json
import shutil
import subprocess
import sys

import pandas as pd
import pytest
import yaml

from tests import paper_mini
from tests.conftest import run_smk, stale_after
from tests.llm_server import LLMServer


def test_paper_mini_config_is_the_paper_config_with_sizes_changed():
    """Generated from config/llava_more.yaml, so the two cannot drift; what it changes is named."""
    paper = yaml.safe_load(paper_mini.PAPER_CONFIG.read_text())
    mini = paper_mini.paper_mini_config("http://127.0.0.1:1/v1")
    changed = {k for k in paper if paper[k] != mini[k]}
    assert changed <= set(paper_mini.SIZE_OVERRIDES) | set(paper_mini.SELECTION_OVERRIDES) | {"autointerp"}
    for key in ("prompts", "question_splits", "model", "base_sae", "data", "sae_finetune"):
        for k, v in paper[key].items():
            if k not in paper_mini.SIZE_OVERRIDES.get(key, {}):
                assert mini[key][k] == v, f"{key}.{k}"
    assert mini["model"]["dtype"] == "bfloat16" and mini["autointerp"]["backend"] == "openai"


@pytest.mark.workflow
def test_paper_world_dag_runs_every_rule_in_bfloat16(workdir, monkeypatch):
    """config/llava_more.yaml end to end on the paper-mini world: conversion, cache, SAEs, diff,
    shift, neutral, auto-interp (OpenAI client against a local server), patching, ablation and
    Neo et al.'s experiments, the model in bfloat16 on CPU."""
    paper_mini.build(workdir)
    with LLMServer() as server:
        (workdir / "paper_mini.yaml").write_text(yaml.safe_dump(paper_mini.paper_mini_config(server.url)))
        monkeypatch.setenv("OPENAI_API_KEY", "sk-local-test")
        r = run_smk("--cores", "2", "--configfile", "paper_mini.yaml", cwd=workdir)
        assert server.requests, "auto-interp never reached the LLM server"
    stats = r.stdout + r.stderr
    stats = stats[stats.index("Job stats:"):stats.index("total")]
    ran = {line.split()[0] for line in stats.splitlines()[3:] if line.strip()}
    listed = run_smk("--list-rules", "--configfile", "paper_mini.yaml", cwd=workdir).stdout.splitlines()
    defined = {line.strip() for line in listed if line.strip() and not line[0].isspace()}
    assert ran == defined, f"rules that did not run: {sorted(defined - ran)}"
    res = workdir / "results" / "llava_more"
    hf = json.loads((workdir / "resources" / "llava_more" / "hf" / "config.json").read_text())
    assert hf["dtype"] == "bfloat16"
    cfg = yaml.safe_load((workdir / "paper_mini.yaml").read_text())
    tables = {t: pd.read_parquet(res / "tables" / f"{t}.parquet") for t in (
        "vlm_accuracy", "sae_fvu", "adapted_features", "shift", "selected_features", "autointerp",
        "head_scores", "patching_validation", "ablation", "visual_token_ablation", "visual_logit_lens",
        "visual_knockout")}
    for name, t in tables.items():
        assert len(t) > 0, f"{name} has no rows"
    assert set(tables["sae_fvu"].layer) == set(cfg["layers"])
    assert tables["sae_fvu"].fvu.notna().all()
    assert (tables["autointerp"].backend == "openai").all() and (tables["autointerp"].status == "ok").all()
    assert set(tables["vlm_accuracy"].family) >= {"general", "vsr"}
    acts = res / "activations" / "vqav2"
    for layer in cfg["layers"]:  # the train stores went once the layer's SAEs were trained
        assert (acts / f"L{layer}.zarr").is_dir() and not list((acts / f"L{layer}_train").glob("part*.zarr"))
    # params hold what a job computes, nothing else: where it runs and the question keywords are
    # not what the cache and the SAEs compute
    assert stale_after("paper_mini.yaml", workdir, lambda c: c.update(device="cpu")) == set()
    keywords = stale_after("paper_mini.yaml", workdir, lambda c: c["question_splits"]["ocr"].append("menu"))
    untouched = {f"{res.relative_to(workdir)}/{p}" for layer in cfg["layers"]
                 for p in (f"activations/vqav2/L{layer}.zarr", *(f"saes/L{layer}/{r}" for r in cfg["sae_finetune"]["regimes"]))}
    assert f"{res.relative_to(workdir)}/shift/L{cfg['layers'][0]}.parquet" in keywords and not keywords & untouched
    shutil.rmtree(workdir / "resources")  # the test's world is large; keep tmp small


@pytest.mark.parametrize("damage,names", [("config", "config.json"), ("shard", "model-00002-of-00002.safetensors")])
def test_cli_failure_is_one_line_naming_the_file_with_the_traceback_in_the_log(tmp_path, damage, names):
    res = paper_mini.build(tmp_path, n_images={"val2014": 1})["resources"]
    ckpt = res / "llava_more" / "original"
    if damage == "config":
        cfg = json.loads((ckpt / "config.json").read_text())
        (ckpt / "config.json").write_text(json.dumps({**cfg, "mm_projector_type": "linear"}))
    else:
        shard = ckpt / names
        shard.write_bytes(shard.read_bytes()[:100])
    log = tmp_path / "convert.log"
    r = subprocess.run([sys.executable, "-m", "stagediff.cli", "convert-llava", "--checkpoint", str(ckpt),
                        "--vision-tower", str(res / "clip-vit-large-patch14-336"), "--out", str(tmp_path / "hf"),
                        "--dtype", "bfloat16", "--log", str(log)], capture_output=True, text=True)
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and names in lines[0] and lines[0].startswith("stagediff convert-llava: error:")
    assert "Traceback (most recent call last)" in log.read_text()
    assert not (tmp_path / "hf").exists()


def test_tokens_read_as_text_not_byte_level_glyphs(tmp_path):
    """Auto-interp prompts and figures show Llama 3's byte-level BPE tokens decoded."""
    from stagediff.models.vlm import token_text

    paper_mini.llama31_tokenizer(tmp_path)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tmp_path)
    ids = tok("What color is the stop sign?\nIt is", add_special_tokens=False)["input_ids"]
    shown = [token_text(tok, i) for i in ids]
    assert not any("Ġ" in t or "Ċ" in t for t in shown), shown
    assert "\\n" in shown and "".join(shown).replace("\\n", "") == "Whatcoloristhestopsign?Itis"
