"""The paper world on files laid out as the real releases (tests/paper_mini.py): conversion of the
original LLaVA-MORE checkpoint, its prompt, and the whole DAG of config/llava_more.yaml in bf16."""
import json
import os
import subprocess
import sys
import shutil

import pandas as pd
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file
from transformers import CLIPModel, LlamaConfig, LlamaForCausalLM
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from stagediff import config as sdc
from stagediff.models.convert import convert_llava
from stagediff.models.vlm import chat_prompt, encode_batch, load_vlm
from tests import paper_mini
from tests.conftest import REPO, run_smk
from tests.llm_server import LLMServer
from tests.test_convert import _llava_reference

QUESTION = "<image>\nWhat color is the stop sign?\nAnswer the question using a single word or phrase."


def _original_parts(res):
    """LLaVA's own pieces, read straight from the original files (not through the converter)."""
    ckpt, tower = res / "llava_more" / "original", res / "clip-vit-large-patch14-336"
    cfg = json.loads((ckpt / "config.json").read_text())
    weights = {}
    for f in sorted(ckpt.glob("*.safetensors")):
        weights |= {k: v.float() for k, v in load_file(f).items()}
    text = {k: v for k, v in cfg.items() if not k.startswith(("mm_", "image_", "tune_", "freeze_", "unfreeze_",
                                                             "tokenizer_", "use_mm_proj"))}
    text.update(model_type="llama")
    lm = LlamaForCausalLM(LlamaConfig(**text))
    lm.load_state_dict({k: v for k, v in weights.items() if not k.startswith(("model.mm_", "model.vision_tower"))})
    proj = torch.nn.Sequential(torch.nn.Linear(cfg["mm_hidden_size"], cfg["hidden_size"]), torch.nn.GELU(),
                               torch.nn.Linear(cfg["hidden_size"], cfg["hidden_size"]))
    proj.load_state_dict({k[len("model.mm_projector."):]: v for k, v in weights.items() if k.startswith("model.mm_")})
    clip = CLIPModel.from_pretrained(tower, use_safetensors=(tower / "model.safetensors").exists())
    return lm.eval(), clip.vision_model.float().eval(), proj.eval(), CLIPImageProcessorPil.from_pretrained(tower)


@pytest.mark.parametrize("tower_in_checkpoint,clip_bin", [(False, False), (True, False), (False, True)])
@torch.no_grad()
def test_real_release_layout_converts_to_the_original_logits(tmp_path, tower_in_checkpoint, clip_bin):
    """llava_llama config with rope_scaling llama3 and GQA, sharded safetensors with an index, a
    Llama-3.1 tokenizer; the tower in the checkpoint or not; CLIP as safetensors or .bin only."""
    res = paper_mini.build(tmp_path, tower_in_checkpoint=tower_in_checkpoint, clip_bin=clip_bin,
                           n_images={"val2014": 2})["resources"]
    convert_llava(res / "llava_more" / "original", res / "clip-vit-large-patch14-336", tmp_path / "hf", "float32")
    model, processor = load_vlm(tmp_path / "hf", pad_to_square=True)
    assert model.config.text_config.rope_parameters["rope_type"] == "llama3"
    assert model.config.text_config.num_key_value_heads == 2 and model.config.image_seq_length == 576
    image = Image.open(sorted((res / "coco" / "val2014").glob("*.jpg"))[0]).convert("RGB")
    assert image.width != image.height
    prompt = chat_prompt(processor, QUESTION)
    b = encode_batch(processor, [image], [prompt])
    lm, vision, proj, image_processor = _original_parts(res)
    got = model(**b).logits[..., : lm.config.vocab_size]
    # the reference renders the same conversation through the original tokenizer's own template
    tok = processor.tokenizer
    want = _llava_reference(lm, vision, proj, tok, image_processor, image, QUESTION)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_prompt_is_llava_more_llama_3_1_conversation(tmp_path):
    """The converted processor renders LLaVA-MORE's conv_llava_llama_3_1: its system message in
    Llama 3.1's system block (knowledge cut-off and date lines first), the user turn, and the
    assistant header that training ends each instruction with. Built here from the format itself."""
    res = paper_mini.build(tmp_path, n_images={"val2014": 1})["resources"]
    convert_llava(res / "llava_more" / "original", res / "clip-vit-large-patch14-336", tmp_path / "hf")
    _, processor = load_vlm(tmp_path / "hf")
    system = ("You are a helpful language and vision assistant. You are able to understand the visual content "
              "that the user provides, and assist the user with a variety of tasks using natural language.")
    want = ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
            "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n" + system + "<|eot_id|>"
            "<|start_header_id|>user<|end_header_id|>\n\n" + QUESTION + "<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert chat_prompt(processor, QUESTION) == want
    # the LLaVA-MORE pad token, a reserved Llama 3 token, not a new one
    assert processor.tokenizer.pad_token == "<|finetune_right_pad_id|>"


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
def test_paper_world_dag_runs_every_rule_in_bfloat16(workdir):
    """config/llava_more.yaml end to end on the paper-mini world: conversion, cache, SAEs, diff,
    shift, neutral, auto-interp (OpenAI client against a local server), patching, ablation and
    Neo et al.'s experiments, the model in bfloat16 on CPU."""
    paper_mini.build(workdir)
    with LLMServer() as server:
        (workdir / "paper_mini.yaml").write_text(yaml.safe_dump(paper_mini.paper_mini_config(server.url)))
        os.environ["OPENAI_API_KEY"] = "sk-local-test"
        try:
            run_smk("--cores", "2", "--configfile", "paper_mini.yaml", cwd=workdir)
        finally:
            del os.environ["OPENAI_API_KEY"]
        assert server.requests, "auto-interp never reached the LLM server"
    res = workdir / "results" / "llava_more"
    hf = json.loads((workdir / "resources" / "llava_more" / "hf" / "config.json").read_text())
    assert hf["dtype"] == "bfloat16"
    cfg = sdc.validate(yaml.safe_load((workdir / "paper_mini.yaml").read_text()))
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
