"""`stagediff plan` on the paper config, before anything is downloaded but the two config.json
files: the full 32-layer DAG from Snakemake's dry run, and the cache size the issue quotes."""
import json

import yaml

from stagediff.cli import main
from stagediff.plan import plan
from tests.conftest import REPO

# Public shapes: meta-llama/Llama-3.1-8B(-Instruct) and openai/clip-vit-large-patch14-336.
LLAMA31_8B = {"hidden_size": 4096, "num_hidden_layers": 32, "intermediate_size": 14336, "vocab_size": 128256,
              "num_attention_heads": 32, "num_key_value_heads": 8, "model_type": "llava_llama",
              "mm_projector_type": "mlp2x_gelu", "mm_vision_select_layer": -2}
CLIP_L_336 = {"model_type": "clip", "vision_config": {"hidden_size": 1024, "num_hidden_layers": 24,
                                                      "intermediate_size": 4096, "image_size": 336, "patch_size": 14}}
PER_LAYER = ["sae_evaluate", "diff_layer", "shift_layer", "neutral_layer", "autointerp_examples",
             "autointerp_describe", "patching_layer", "ablation_layer"]


def _paper_config(tmp_path):
    cfg = yaml.safe_load((REPO / "config" / "llava_more.yaml").read_text())
    for key, doc in (("checkpoint", LLAMA31_8B), ("vision_tower", CLIP_L_336)):
        (tmp_path / key).mkdir()
        (tmp_path / key / "config.json").write_text(json.dumps(doc))
        cfg["model"]["original"][key] = str(tmp_path / key)
    path = tmp_path / "llava_more.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_paper_plan_counts_the_full_dag_and_the_cache_size(tmp_path):
    p = plan(_paper_config(tmp_path))
    jobs = p["jobs"]
    assert jobs["sae_finetune"] == 32 * 4 and jobs["convert_llava"] == 1
    assert sorted(k for k in jobs if k.startswith("cache_activations_g")) == [f"cache_activations_g{i}" for i in range(4)]
    assert all(jobs[rule] == 32 for rule in PER_LAYER), {r: jobs.get(r) for r in PER_LAYER}
    train = p["disk"]["train"]  # 50k VQAv2 questions, 576 image + 20 text tokens, bf16
    assert train["samples"] == 50_000
    assert 240 < train["all_tokens_gb"] < 250 and 7.5 < train["text_tokens_gb"] < 9
    assert p["gpu_hours"]["sae_finetune"] > 0 and p["arch"].image_tokens == 576


def test_plan_cli_prints_the_table(tmp_path, capsys):
    main(["plan", str(_paper_config(tmp_path)), "--gpu-tflops", "312"])
    out = capsys.readouterr().out
    assert "sae_finetune" in out and "128" in out and "GB all tokens" in out and "312 TFLOP/s" in out
